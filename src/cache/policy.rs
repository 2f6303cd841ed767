//! The rules of a shared cache, as pure functions: cache directives (RFC 9111 §5.2) and their
//! targeted form (RFC 9213), HTTP dates (RFC 9110 §5.6.7), freshness and age (RFC 9111
//! §4.2), storability (§3), Vary (§4.1), and the client's own conditionals and ranges
//! (RFC 9110 §13, §14).

use std::cell::Cell;
use std::mem::ManuallyDrop;

use crate::http::{list_items, trim_ows};

use super::fields::FieldsRef;

/// Delta-seconds larger than this are read as this (RFC 9111 §1.2.2: 2^31).
pub const MAX_DELTA: u64 = 1 << 31;
/// Most bytes of a directive list read. A longer line (hostile, or a broken origin) is not
/// read: it is taken as `no-store` and `no-cache` ([`Directives::unread`]), since what it says
/// past any bound could be `private` or `no-store` (RFC 9111 §3).
const MAX_DIRECTIVES_BYTES: usize = 8 * 1024;

/// Status codes this cache understands (RFC 9110 §15) and may store.
pub fn understood(status: u16) -> bool {
    matches!(
        status,
        200 | 203
            | 204
            | 300
            | 301
            | 302
            | 303
            | 307
            | 308
            | 400
            | 403
            | 404
            | 405
            | 410
            | 414
            | 421
            | 451
            | 500
            | 501
            | 502
            | 503
            | 504
    )
}

/// Heuristically cacheable by default (RFC 9110 §15.1).
pub fn heuristic_status(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Cache directives of a response or a request (RFC 9111 §5.2). Unknown directives are
/// ignored (§5.2.3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directives {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    /// `no-cache` without fields: every use needs validation.
    pub no_cache: bool,
    pub private: bool,
    /// The fields `private="a, b"` and `no-cache="a, b"` name, when either form was given
    /// (rare: boxed, so that a `Directives` is small to make, move and drop; see
    /// [`Directives::private_fields`], [`Directives::no_cache_fields`]). Freed by
    /// `Directives`' own `Drop`, which looks at it inline: the drop glue of a box would be a
    /// call on every drop (two per stored miss), most of them of none. Private, so that
    /// nothing outside can overwrite it (a `ManuallyDrop` overwritten is never freed).
    named: Option<ManuallyDrop<Box<NamedFields>>>,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub must_understand: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    // Request directives (§5.2.1).
    /// `max-stale` (`Some(None)`: any staleness).
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
}

impl Drop for Directives {
    #[inline]
    fn drop(&mut self) {
        if let Some(named) = self.named.take() {
            drop_named(named);
        }
    }
}

/// Frees what [`Directives::named`] held (rare: out of the way of the inlined test).
#[cold]
#[inline(never)]
fn drop_named(named: ManuallyDrop<Box<NamedFields>>) {
    drop(ManuallyDrop::into_inner(named));
}

/// The field names `private` and `no-cache` directives qualify (§5.2.2.4, §5.2.2.7), lower case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedFields {
    /// `no-cache="a, b"`: these fields are not sent from a stored response.
    pub no_cache: Vec<Box<[u8]>>,
    /// `private="a, b"`: a shared cache stores the response without these fields.
    pub private: Vec<Box<[u8]>>,
}

/// delta-seconds (§1.2.2): digits, saturating at [`MAX_DELTA`]; a quoted form is accepted
/// (§5.2). `None` when invalid.
pub fn delta_seconds(v: &[u8]) -> Option<u64> {
    let v = match trim_ows(v) {
        [b'"', inner @ .., b'"'] => inner,
        v => v,
    };
    if v.is_empty() {
        return None;
    }
    let mut n = 0u64;
    for d in v {
        if !d.is_ascii_digit() {
            return None;
        }
        // At most 2^31 * 10 + 9 before the bound: no overflow.
        n = (n * 10 + u64::from(d - b'0')).min(MAX_DELTA);
    }
    Some(n)
}

/// Splits a list on commas outside quoted strings.
pub(super) fn split_quoted(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let mut i = 0;
    let mut quoted = false;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while i < v.len() {
            if !quoted {
                // Outside a quoted string only a comma or a quote changes anything: skip to
                // the next one (most lines have no quote, and one or two commas; a plain scan,
                // since memchr's setup costs more than it saves on lines this short).
                match v[i..].iter().position(|b| matches!(b, b',' | b'"')) {
                    Some(k) => i += k,
                    None => break,
                }
            }
            let b = v[i];
            if quoted && b == b'\\' {
                i += 2;
                continue;
            }
            if b == b'"' {
                quoted = !quoted;
            } else if b == b',' && !quoted {
                let item = &v[start..i];
                i += 1;
                start = i;
                return Some(item);
            }
            i += 1;
        }
        done = true;
        Some(&v[start.min(v.len())..])
    })
}

const NO_STORE: &[u8] = b"no-store";

/// The delta-seconds of a line that is `max-age=` and digits (in any case, OWS around it),
/// `None` for any other line.
#[inline(always)]
fn lone_max_age(line: &[u8]) -> Option<u64> {
    // `max-age=` and a digit at least: a shorter line is not one, trimmed or not (trimming
    // only shortens it).
    if line.len() <= 8 {
        return None;
    }
    // A line seldom has OWS at either end (the parser drops it before the value): one that
    // has is trimmed out of line (trimmed here, the line's start and length were copied to
    // where the code goes on before each of the four tests).
    let ows = |b: u8| (b == b' ') | (b == b'\t');
    if ows(line[0]) | ows(line[line.len() - 1]) {
        return lone_max_age_trimmed(line);
    }
    max_age_line(line)
}

/// [`lone_max_age`] of a line with OWS at an end.
#[cold]
#[inline(never)]
fn lone_max_age_trimmed(line: &[u8]) -> Option<u64> {
    max_age_line(trim_ows(line))
}

/// [`lone_max_age`] of a line without OWS at either end.
#[inline(always)]
fn max_age_line(line: &[u8]) -> Option<u64> {
    if line.len() <= 8 || !is_word(word(line, 0), word(b"max-age=", 0)) {
        return None;
    }
    let digits = &line[8..];
    if digits.len() <= 8 {
        // The line's last eight bytes: its digits, and the end of `max-age=` before them.
        return short_digits(word(line, line.len() - 8), digits.len());
    }
    // (Nine digits or more: rare, out of the usual line's code.)
    std::hint::cold_path();
    let mut n = 0u64;
    if digits.len() <= MAX_UNBOUNDED_DIGITS {
        // Too few digits to pass the bound: it is applied once, at the end.
        for d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            n = n * 10 + u64::from(d - b'0');
        }
        return Some(n.min(MAX_DELTA));
    }
    for d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        // At most 2^31 * 10 + 9 before the bound: no overflow.
        n = (n * 10 + u64::from(d - b'0')).min(MAX_DELTA);
    }
    Some(n)
}

/// Digits of a delta-seconds that cannot reach [`MAX_DELTA`] (10^9 - 1 < 2^31).
const MAX_UNBOUNDED_DIGITS: usize = 9;

/// The value of the last `n` (1 to 8) bytes of the eight `x` holds (in memory order, as
/// [`word`] reads them) when each is an ASCII digit, all at once; `None` when one is not.
/// The bytes before them must be below 0xfa (none carries when 6 is added: [`lone_max_age`]
/// gives the end of `max-age=`). Eight digits are less than 10^8, below [`MAX_DELTA`].
#[inline(always)]
fn short_digits(x: u64, n: usize) -> Option<u64> {
    debug_assert!((1..=8).contains(&n));
    // The digits are the high `n` bytes of the little-endian word.
    let keep = u64::MAX << ((8 - n.clamp(1, 8)) * 8);
    let zeros = 0x3030_3030_3030_3030 & keep;
    let high = 0xf0f0_f0f0_f0f0_f0f0 & keep;
    // A digit is 0x30..=0x39: its high half is 3, and still is once 6 is added.
    if x & high != zeros || x.wrapping_add(0x0606_0606_0606_0606) & high != zeros {
        return None;
    }
    // Each byte's digit, the bytes below them 0 (leading zeros); then pairs, fours and the
    // eight combined, the digit at the lower address the more significant.
    let mut v = (x & keep) - zeros;
    v = (v * 10 + (v >> 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v * 100 + (v >> 16)) & 0x0000_ffff_0000_ffff;
    v = (v * 10_000 + (v >> 32)) & 0xffff_ffff;
    Some(v)
}

fn field_list(v: &[u8]) -> Vec<Box<[u8]>> {
    let v = trim_ows(v);
    let v = v
        .strip_prefix(b"\"")
        .and_then(|x| x.strip_suffix(b"\""))
        .unwrap_or(v);
    list_items(v)
        .map(|f| f.to_ascii_lowercase().into_boxed_slice())
        .filter(|f| !f.is_empty())
        .collect()
}

impl Directives {
    /// The fields `private="..."` names (none when it names none).
    pub fn private_fields(&self) -> &[Box<[u8]>] {
        self.named.as_ref().map_or(&[], |n| &n.private[..])
    }

    /// The fields `no-cache="..."` names (none when it names none).
    pub fn no_cache_fields(&self) -> &[Box<[u8]>] {
        self.named.as_ref().map_or(&[], |n| &n.no_cache[..])
    }

    /// Whether `private="..."` or `no-cache="..."` named any field.
    pub fn names_fields(&self) -> bool {
        self.named.is_some()
    }

    fn named_mut(&mut self) -> &mut NamedFields {
        self.named
            .get_or_insert_with(|| ManuallyDrop::new(Box::default()))
    }

    /// Adds the directives of one `Cache-Control` field line. A directive given twice keeps
    /// its first value (§4.2.1).
    // Inlined: the most common line of all, `max-age=N` alone, is read where the line is found
    // (once per stored miss), the others by a call.
    #[inline(always)]
    pub fn add(&mut self, line: &[u8]) {
        if line.len() > MAX_DIRECTIVES_BYTES {
            self.unread();
            return;
        }
        // Read without the scan (to the same effect: a test compares the two).
        if let Some(secs) = lone_max_age(line) {
            self.max_age = self.max_age.or(Some(secs));
            return;
        }
        // The usual line of a response kept out of the store, read without the scan too.
        if line.len() == NO_STORE.len() && line.eq_ignore_ascii_case(NO_STORE) {
            self.no_store = true;
            return;
        }
        self.add_items(line);
    }

    /// A directive line too long to read ([`MAX_DIRECTIVES_BYTES`]): read as the directives
    /// that keep it out of the store and the store out of its answer, `no-store` and
    /// `no-cache`, whatever else the line says (it might say `private` past the bound).
    #[cold]
    #[inline(never)]
    fn unread(&mut self) {
        self.no_store = true;
        self.no_cache = true;
    }

    /// [`Directives::add`] of a line (at most [`MAX_DIRECTIVES_BYTES`]) that is not
    /// `max-age=N` alone.
    #[inline(never)]
    fn add_items(&mut self, line: &[u8]) {
        // One scan splits the line on commas outside quoted strings, as `split_quoted` does,
        // and notes each item's first "=" outside them. (An item with a quote before its
        // first "=" has a name no directive has, whichever "=" is taken.)
        let mut start = 0;
        let mut eq = None;
        let mut i = 0;
        while i < line.len() {
            match line[i] {
                b',' => {
                    self.item(&line[start..i], eq);
                    start = i + 1;
                    eq = None;
                }
                b'=' if eq.is_none() => eq = Some(i - start),
                b'"' => {
                    // To the closing quote; a backslash escapes the byte after it.
                    i += 1;
                    while i < line.len() {
                        match line[i] {
                            b'\\' => i += 2,
                            b'"' => break,
                            _ => i += 1,
                        }
                    }
                }
                _ => {}
            }
            i += 1;
        }
        self.item(&line[start.min(line.len())..], eq);
    }

    /// One item of a `Cache-Control` line, `eq` the offset of its first "=" (if any).
    fn item(&mut self, item: &[u8], eq: Option<usize>) {
        let ows = |b: &u8| matches!(b, b' ' | b'\t');
        let (name, value) = match eq {
            Some(p) => {
                let name = &item[..p];
                let from = name.iter().position(|b| !ows(b)).unwrap_or(p);
                let value = &item[p + 1..];
                let to = value.iter().rposition(|b| !ows(b)).map_or(0, |e| e + 1);
                (&name[from..], Some(&value[..to]))
            }
            None => match trim_ows(item) {
                [] => return,
                name => (name, None),
            },
        };
        // §5.2: `cache-directive = token [ "=" ( token / quoted-string ) ]`, no whitespace
        // around "=": `max-age =60` or `max-age= 60` is not a directive this cache knows, and
        // is ignored (§5.2.3).
        if name.last().is_some_and(ows) || value.and_then(|v| v.first()).is_some_and(ows) {
            return;
        }
        self.directive(name, value);
    }

    /// [`Directives::add`] as items of [`split_quoted`], each trimmed and cut at its first
    /// "=": the reference the one-scan version is tested against.
    #[cfg(test)]
    fn add_by_items(&mut self, line: &[u8]) {
        if line.len() > MAX_DIRECTIVES_BYTES {
            self.unread();
            return;
        }
        for item in split_quoted(line) {
            let item = trim_ows(item);
            if item.is_empty() {
                continue;
            }
            let (name, value) = match item.iter().position(|b| *b == b'=') {
                Some(p) => (&item[..p], Some(&item[p + 1..])),
                None => (item, None),
            };
            let spaced = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
            if spaced(name.last()) || value.is_some_and(|v| spaced(v.first())) {
                continue;
            }
            self.directive(name, value);
        }
    }

    /// A directive known here is listed in [`TARGETED_KNOWN`] too (a test checks that each
    /// listed one has an effect).
    fn directive(&mut self, name: &[u8], value: Option<&[u8]>) {
        // By length first: a name is compared with at most three directives (most with one).
        let is = |s: &[u8]| is_name(name, s);
        let secs = || value.and_then(delta_seconds);
        match name.len() {
            // An invalid value makes the response stale (§4.2.1, §5.2.2.1).
            7 if is(b"max-age") => self.max_age = self.max_age.or(Some(secs().unwrap_or(0))),
            7 if is(b"private") => match value {
                Some(v) if !field_list(v).is_empty() => {
                    self.named_mut().private.extend(field_list(v))
                }
                _ => self.private = true,
            },
            8 if is(b"s-maxage") => self.s_maxage = self.s_maxage.or(Some(secs().unwrap_or(0))),
            8 if is(b"no-store") => self.no_store = true,
            8 if is(b"no-cache") => match value {
                Some(v) if !field_list(v).is_empty() => {
                    self.named_mut().no_cache.extend(field_list(v))
                }
                _ => self.no_cache = true,
            },
            6 if is(b"public") => self.public = true,
            15 if is(b"must-revalidate") => self.must_revalidate = true,
            15 if is(b"must-understand") => self.must_understand = true,
            16 if is(b"proxy-revalidate") => self.proxy_revalidate = true,
            22 if is(b"stale-while-revalidate") => {
                if let Some(s) = secs() {
                    self.stale_while_revalidate = self.stale_while_revalidate.or(Some(s));
                }
            }
            14 if is(b"stale-if-error") => {
                if let Some(s) = secs() {
                    self.stale_if_error = self.stale_if_error.or(Some(s));
                }
            }
            14 if is(b"only-if-cached") => self.only_if_cached = true,
            // Request directives (§5.2.1). An invalid argument must not make the client
            // accept more staleness than a valid one (§1.2.2): it counts as the one that
            // accepts the least, `max-stale=0` (no staleness, §5.2.1.2; the bare directive
            // is any staleness) and the longest `min-fresh` (always validated, §5.2.1.3), as
            // an invalid `max-age` counts as 0 above.
            9 if is(b"max-stale") && self.max_stale.is_none() => {
                self.max_stale = Some(value.map(|v| delta_seconds(v).unwrap_or(0)));
            }
            9 if is(b"min-fresh") => {
                self.min_fresh = self.min_fresh.or(Some(secs().unwrap_or(MAX_DELTA)))
            }
            _ => {}
        }
    }

    /// The directives of a targeted field (RFC 9213 §2.1): a Structured Fields Dictionary
    /// (RFC 8941 §3.2). `None` when it does not parse: the field is then ignored as a whole.
    pub fn targeted(value: &[u8]) -> Option<Directives> {
        let mut d = Directives::default();
        let value = trim_ows(value);
        if value.is_empty() {
            return None;
        }
        // Too long to read: not a field to ignore (RFC 9213 §2.2 falls back to Cache-Control
        // only for an invalid one), but one that may say `no-store` past the bound.
        if value.len() > MAX_DIRECTIVES_BYTES {
            d.unread();
            return Some(d);
        }
        // RFC 8941 §3.2: of a key given twice, only its last member counts (`?0` included).
        // A first pass checks every member and notes the last of each known directive.
        let mut last = [usize::MAX; TARGETED_KNOWN.len()];
        for (i, member) in split_quoted(value).enumerate() {
            let (key, _) = targeted_member(member)?;
            if let Some(k) = TARGETED_KNOWN.iter().position(|n| *n == key) {
                last[k] = i;
            }
        }
        for (i, member) in split_quoted(value).enumerate() {
            let (key, val) = targeted_member(member)?;
            // Unknown directives are ignored (RFC 9111 §5.2.3).
            let Some(k) = TARGETED_KNOWN.iter().position(|n| *n == key) else {
                continue;
            };
            if last[k] != i {
                continue;
            }
            // Booleans: `?1` is the directive, `?0` is its absence.
            let val = match val {
                Some(b"?0") => continue,
                Some(b"?1") => None,
                // `private` and `no-cache` take field names (a String, or a Token); a number
                // names no field, so the directive stands unqualified: of the two readings the
                // more restrictive (RFC 9111 §4.2.1), not a field list holding "1".
                Some(v)
                    if matches!(key, b"private" | b"no-cache")
                        && v.first().is_some_and(|b| b.is_ascii_digit() || *b == b'-') =>
                {
                    None
                }
                v => v,
            };
            d.directive(key, val);
        }
        Some(d)
    }
}

/// The directives [`Directives::directive`] knows, as sf-keys (lower case).
const TARGETED_KNOWN: [&[u8]; 14] = [
    b"max-age",
    b"s-maxage",
    b"no-store",
    b"no-cache",
    b"private",
    b"public",
    b"must-revalidate",
    b"proxy-revalidate",
    b"must-understand",
    b"stale-while-revalidate",
    b"stale-if-error",
    b"max-stale",
    b"min-fresh",
    b"only-if-cached",
];

/// One member of a targeted field: its key and bare item (parameters are allowed and
/// ignored); `None` when it is not a valid member.
fn targeted_member(member: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let member = trim_ows(member);
    let main = member.split(|b| *b == b';').next().unwrap_or(b"");
    let (key, val) = match main.iter().position(|b| *b == b'=') {
        Some(p) => (&main[..p], Some(&main[p + 1..])),
        None => (main, None),
    };
    if !sf_key(key) || val.is_some_and(|v| !sf_bare_item(v)) {
        return None;
    }
    // RFC 9213 §2.1: numeric directives are sf-integers (a string is invalid); `?0` is
    // their absence.
    if matches!(
        key,
        b"max-age" | b"s-maxage" | b"stale-while-revalidate" | b"stale-if-error"
    ) && !val.is_some_and(|v| v == b"?0" || v.iter().all(u8::is_ascii_digit))
    {
        return None;
    }
    Some((key, val))
}

/// sf-key (RFC 8941 §3.1.2): `( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`.
fn sf_key(k: &[u8]) -> bool {
    match k.first() {
        Some(b) if b.is_ascii_lowercase() || *b == b'*' => k[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(b)),
        _ => false,
    }
}

/// A bare item: integer, decimal, string, token or boolean (RFC 8941 §3.3).
fn sf_bare_item(v: &[u8]) -> bool {
    match v.first() {
        None => false,
        Some(b'?') => v == b"?0" || v == b"?1",
        Some(b'"') => {
            v.len() >= 2
                && v.ends_with(b"\"")
                && v[1..v.len() - 1].iter().all(|b| (0x20..0x7f).contains(b))
        }
        Some(b) if b.is_ascii_digit() || *b == b'-' => {
            let digits = if *b == b'-' { &v[1..] } else { v };
            !digits.is_empty()
                && digits.len() <= 16
                && digits.iter().all(|b| b.is_ascii_digit() || *b == b'.')
        }
        Some(b) if b.is_ascii_alphabetic() || *b == b'*' => v
            .iter()
            .all(|b| crate::http::is_tchar(*b) || b":/".contains(b)),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Dates (RFC 9110 §5.6.7): IMF-fixdate, and the obsolete RFC 850 and asctime forms, which a
// recipient must accept.

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
}

/// The month of a date, matched without regard to case: RFC 9111 §4.2 asks a cache to read
/// dates case-insensitively although RFC 9110 §5.6.7 defines them case-sensitive.
fn month(s: &[u8]) -> Option<u32> {
    MONTHS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(s))
        .map(|i| i as u32 + 1)
}

/// The zone of an IMF-fixdate or rfc850-date: "GMT" in any case (RFC 9111 §4.2); any other
/// zone makes the date invalid.
fn gmt(z: &[u8]) -> bool {
    z.eq_ignore_ascii_case(b"GMT")
}

/// `time-of-day = hour ":" minute ":" second`, two digits each (RFC 9110 §5.6.7).
fn hms(s: &[u8]) -> Option<(u32, u32, u32)> {
    let mut it = s.split(|b| *b == b':');
    let mut two = || it.next().filter(|p| p.len() == 2).and_then(num);
    let (h, m, sec) = (two()?, two()?, two()?);
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some((h, m, sec))
}

fn to_secs(y: i64, mo: u32, d: u32, (h, mi, s): (u32, u32, u32)) -> Option<u64> {
    // A day the month does not have (`31 Feb`) is no date: it is not read as one in the next
    // month.
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=month_days).contains(&d) || y < 1970 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    u64::try_from(days * 86_400 + i64::from(h * 3600 + mi * 60 + s)).ok()
}

/// The year of an rfc850-date's two digits `yy` at Unix second `now`: RFC 9110 §5.6.7, a
/// year that appears to be more than 50 years in the future is the most recent past year with
/// the same last two digits.
fn rfc850_year(yy: u32, now: u64) -> i64 {
    let (this, _, _) = crate::date::civil_from_days((now / 86_400) as i64);
    let y = this - this.rem_euclid(100) + i64::from(yy);
    if y > this + 50 {
        y - 100
    } else if y + 100 <= this + 50 {
        y + 100
    } else {
        y
    }
}

/// `n` digits exactly.
fn digits(s: &[u8], n: usize) -> Option<u32> {
    (s.len() == n).then_some(s).and_then(num)
}

/// Seconds since the epoch of an HTTP-date, `None` when it is not one. The three forms of
/// RFC 9110 §5.6.7 are taken as written there (single spaces, two-digit time fields, "GMT"),
/// except that the month and "GMT" are matched in any case, as RFC 9111 §4.2 asks of a
/// cache; anything else is invalid, which for `Expires` means already expired (RFC 9111
/// §5.3).
// Inlined: the memo's answer, the usual one, costs less than a call. The memo holds a date
// that parsed, which has no OWS around it: a value equal to it is that date trimmed too, and
// is compared before it is trimmed.
#[inline]
pub fn parse_http_date(v: &[u8]) -> Option<u64> {
    if let Ok(fixed) = <&[u8; IMF_FIXDATE_LEN]>::try_from(v) {
        let (last, secs) = LAST_DATE.get();
        if last == *fixed {
            return Some(secs);
        }
    }
    // (Once a second, or a date not in the fixed form: the memo's hit is the usual path.)
    std::hint::cold_path();
    parse_http_date_trimmed(v)
}

/// [`parse_http_date`] past the memo's first look: the value trimmed, then the memo and the
/// parse.
#[inline(never)]
fn parse_http_date_trimmed(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    let Ok(fixed) = <[u8; IMF_FIXDATE_LEN]>::try_from(v) else {
        return parse_date_forms(v);
    };
    let (last, secs) = LAST_DATE.get();
    if last == fixed {
        return Some(secs);
    }
    let parsed = parse_date_forms(v);
    if let Some(secs) = parsed {
        LAST_DATE.set((fixed, secs));
    }
    parsed
}

/// Bytes of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
const IMF_FIXDATE_LEN: usize = 29;

thread_local! {
    /// The last date of [`IMF_FIXDATE_LEN`] bytes this thread parsed, and its value: an
    /// origin's `Date` changes once a second, so most responses carry the one the response
    /// before carried, and it is compared instead of parsed. It starts as the epoch, a date
    /// that parses to 0.
    static LAST_DATE: Cell<([u8; IMF_FIXDATE_LEN], u64)> =
        const { Cell::new((*b"Thu, 01 Jan 1970 00:00:00 GMT", 0)) };
}

/// [`parse_http_date`] itself, without the memo.
fn parse_date_forms(v: &[u8]) -> Option<u64> {
    // Every form has at most six space-separated parts: more is not a date (and nothing is
    // allocated to find out).
    let mut parts: [&[u8]; 6] = [b""; 6];
    let mut n = 0;
    for part in v.split(|b| *b == b' ') {
        *parts.get_mut(n)? = part;
        n += 1;
    }
    match &parts[..n] {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [wd, d, mo, y, t, z] if wd.len() == 4 && wd.ends_with(b",") && gmt(z) => {
            to_secs(i64::from(digits(y, 4)?), month(mo)?, digits(d, 2)?, hms(t)?)
        }
        // rfc850-date (obsolete): Sunday, 06-Nov-94 08:49:37 GMT (the full day name)
        [wd, dmy, t, z] if wd.len() > 4 && wd.ends_with(b",") && gmt(z) => {
            let mut it = dmy.split(|b| *b == b'-');
            let (d, mo, y) = (
                digits(it.next()?, 2)?,
                month(it.next()?)?,
                digits(it.next()?, 2)?,
            );
            if it.next().is_some() {
                return None;
            }
            to_secs(rfc850_year(y, crate::cache::now_secs()), mo, d, hms(t)?)
        }
        // asctime-date (obsolete): Sun Nov  6 08:49:37 1994, the day as 2DIGIT or SP DIGIT
        [wd, mo, d, t, y] if wd.len() == 3 && d.len() == 2 => {
            to_secs(i64::from(digits(y, 4)?), month(mo)?, num(d)?, hms(t)?)
        }
        [wd, mo, b"", d, t, y] if wd.len() == 3 && d.len() == 1 => {
            to_secs(i64::from(digits(y, 4)?), month(mo)?, num(d)?, hms(t)?)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Entity tags (RFC 9110 §8.8.3) and conditionals (§13).

/// The opaque tag and whether it is weak; `None` when malformed.
fn etag_parts(t: &[u8]) -> Option<(bool, &[u8])> {
    let t = trim_ows(t);
    let (weak, rest) = match t.strip_prefix(b"W/") {
        Some(r) => (true, r),
        None => (false, t),
    };
    let inner = rest.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.contains(&b'"') {
        return None;
    }
    Some((weak, inner))
}

/// Weak comparison (§8.8.3.2): the opaque tags match, weak or not.
pub fn weak_match(a: &[u8], b: &[u8]) -> bool {
    matches!((etag_parts(a), etag_parts(b)), (Some((_, x)), Some((_, y))) if x == y)
}

/// Strong comparison: both strong and equal.
pub fn strong_match(a: &[u8], b: &[u8]) -> bool {
    matches!((etag_parts(a), etag_parts(b)), (Some((false, x)), Some((false, y))) if x == y)
}

/// One `If-Match` line (RFC 9110 §13.1.1) against a stored ETag: true when the condition
/// holds (`*`, or a listed tag matches strongly). Tags are split outside quoted strings.
pub fn match_hits(if_match: &[u8], etag: Option<&[u8]>) -> bool {
    if trim_ows(if_match) == b"*" {
        return true;
    }
    let Some(etag) = etag else { return false };
    split_quoted(if_match).any(|t| strong_match(t, etag))
}

/// `If-None-Match` (§13.1.2) against a stored ETag: true when the condition is false (the
/// representation matches: answer 304).
pub fn none_match_hits(if_none_match: &[u8], etag: Option<&[u8]>) -> bool {
    if trim_ows(if_none_match) == b"*" {
        return true;
    }
    let Some(etag) = etag else { return false };
    split_quoted(if_none_match).any(|t| weak_match(t, etag))
}

/// One byte range of a `Range` header (§14.1.2) against a representation of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Serve the whole representation (no range, several ranges, or not understood).
    Full,
    /// Serve bytes `start..=end`.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

pub fn byte_range(range: &[u8], len: u64) -> RangeAnswer {
    let r = trim_ows(range);
    // Range units are case-insensitive (RFC 9110 §14.1).
    let Some(spec) = r
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case(b"bytes="))
        .map(|_| &r[6..])
    else {
        return RangeAnswer::Full;
    };
    if spec.contains(&b',') {
        // Several ranges: answering 200 with the whole is allowed (§14.2).
        return RangeAnswer::Full;
    }
    let spec = trim_ows(spec);
    let Some(dash) = spec.iter().position(|b| *b == b'-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (trim_ows(&spec[..dash]), trim_ows(&spec[dash + 1..]));
    let digits = |s: &[u8]| -> Option<u64> {
        if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        s.iter().try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
    };
    match (a.is_empty(), b.is_empty()) {
        // -N: the last N bytes.
        (true, false) => match digits(b) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(n) if len > 0 => RangeAnswer::Part(len.saturating_sub(n), len - 1),
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (false, _) => {
            let Some(start) = digits(a) else {
                return RangeAnswer::Full;
            };
            let end = if b.is_empty() {
                Some(u64::MAX)
            } else {
                digits(b)
            };
            let Some(end) = end else {
                return RangeAnswer::Full;
            };
            if end < start {
                return RangeAnswer::Full;
            }
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Part(start, end.min(len - 1))
        }
        _ => RangeAnswer::Full,
    }
}

/// The byte range a single-part 206 carries (RFC 9110 §14.4): bytes `first..=last` of a
/// representation of `complete` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    pub last: u64,
    pub complete: u64,
}

impl ContentRange {
    /// How many bytes the range holds (`last - first + 1`, which [`content_range`] checked
    /// fits; never 0).
    pub fn bytes(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Whether `first..=last` of the representation lies wholly inside this range.
    pub fn covers(&self, first: u64, last: u64) -> bool {
        self.first <= first && last <= self.last
    }
}

/// A `Content-Range` value that describes one stored piece: `bytes first-last/complete`
/// (RFC 9110 §14.4, the unit case-insensitive, §14.1), with `first <= last < complete`. `None`
/// for anything else: another unit, an unknown complete length (`*`), the unsatisfied form
/// (`*/N`), a range that ends before it starts or past the representation, numbers of more
/// than 19 digits, or any other byte (whitespace inside the value included).
pub fn content_range(v: &[u8]) -> Option<ContentRange> {
    let v = trim_ows(v);
    let rest = v
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case(b"bytes "))
        .map(|_| &v[6..])?;
    let dash = rest.iter().position(|b| *b == b'-')?;
    let slash = rest.iter().position(|b| *b == b'/')?;
    if slash < dash {
        return None;
    }
    let number = |s: &[u8]| -> Option<u64> {
        if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        s.iter().try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
    };
    let first = number(&rest[..dash])?;
    let last = number(&rest[dash + 1..slash])?;
    let complete = number(&rest[slash + 1..])?;
    // (`last < complete` bounds `last - first + 1` below u64::MAX.)
    (first <= last && last < complete).then_some(ContentRange {
        first,
        last,
        complete,
    })
}

// ---------------------------------------------------------------------------------------------
// Vary (§4.1).

/// What [`vary_value`] gives for a field absent from the request: a single NUL, which no
/// field value can hold (RFC 9110 §5.5), so an absent field matches only an absent one
/// (RFC 9111 §4.1), never an empty one.
pub const VARY_ABSENT: &[u8] = b"\0";

/// A request header's value as it is compared for Vary: the field lines joined, whitespace
/// around items removed; `Accept-Encoding` reduced to the sorted set of accepted codings, then
/// the refused ones that change what is acceptable (an item that is not `codings [ weight ]`
/// kept as sent, in lower case);
/// a valid `Accept-Language` in the form of [`accept_language`]; [`VARY_ABSENT`] when the
/// request has no such field.
pub fn vary_value(name: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
    let mut items: Vec<Vec<u8>> = Vec::new();
    let mut present = false;
    for v in values {
        present = true;
        for item in split_quoted(v) {
            let item = trim_ows(item);
            if !item.is_empty() {
                items.push(item.to_vec());
            }
        }
    }
    if name.eq_ignore_ascii_case(b"accept-encoding") {
        let (mut accepted, mut refused): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        for i in &items {
            let mut parts = i.split(|b| *b == b';');
            let coding = trim_ows(parts.next().unwrap_or_default()).to_ascii_lowercase();
            if coding.is_empty() {
                continue;
            }
            // `codings [ weight ]` (RFC 9110 §12.5.3, §12.4.2). An item that is not (a weight
            // that is no `qvalue`, such as `q=` or `q=00`, or another parameter) has no
            // specified meaning (an origin may read `gzip;q=` as gzip accepted): it is kept
            // as sent, in lower case, never merged with a refusal or an acceptance.
            let weight = match (parts.next().map(trim_ows), parts.next()) {
                (None, _) => Some(1000),
                (Some([b'q' | b'Q', b'=', v @ ..]), None) => qvalue(v),
                _ => None,
            };
            match weight {
                Some(0) => refused.push(coding),
                Some(_) => accepted.push(coding),
                None => accepted.push(i.to_ascii_lowercase()),
            }
        }
        if !present {
            return VARY_ABSENT.to_vec();
        }
        accepted.sort();
        accepted.dedup();
        // A coding refused with q=0 is left out when it is not acceptable either way (not
        // listed, no `*`: RFC 9110 §12.5.3), so `gzip;q=0` is the empty field. It is kept when
        // it changes what is acceptable: an exception to an accepted `*` (`*, gzip;q=0` is
        // not `*`), `identity` (acceptable unless refused) and `*` (which refuses the
        // identity too, unless listed), and a coding also listed as accepted (which of the two
        // counts is not specified).
        let star = accepted.iter().any(|c| c == b"*");
        refused
            .retain(|c| star || c == b"identity" || c == b"*" || accepted.binary_search(c).is_ok());
        refused.sort();
        refused.dedup();
        let mut out = accepted.join(&b","[..]);
        for c in refused {
            if !out.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(&c);
            out.extend_from_slice(b";q=0");
        }
        return out;
    }
    if !present {
        return VARY_ABSENT.to_vec();
    }
    if name.eq_ignore_ascii_case(b"accept-language") {
        if let Some(v) = accept_language(&items) {
            return v;
        }
    }
    items.join(&b", "[..])
}

/// The most language ranges, and bytes of them, that [`accept_language`] normalises: a longer
/// `Accept-Language` (browsers send a handful) is compared as its items are.
pub const LANGUAGE_RANGES_MAX: usize = 32;
/// See [`LANGUAGE_RANGES_MAX`].
pub const LANGUAGE_BYTES_MAX: usize = 1024;

/// An `Accept-Language` value (its items, trimmed, none empty) in a form that only values of
/// the same meaning share (RFC 9111 §4.1: normalised "in a way that is known to have
/// identical semantics, according to the header field's specification"); `None` when it is
/// not `#( language-range [ weight ] )` (RFC 9110 §12.5.4, RFC 4647 §2.1: such a value is
/// compared as it is, never merged with a valid one) or is over the caps.
///
/// - Ranges in lower case, `q` too: they are case-insensitive (RFC 4647 §2, RFC 9110
///   §12.4.2); no OWS around `;`.
/// - Weights as numbers: `q=0.50` is `q=0.5`, and `q=1`, `q=1.000` are written as no weight
///   (the default, §12.4.2); `q=0` is kept (not acceptable, §12.4.2: `*, fr;q=0` is not `*`).
/// - Ranges of different weights in descending order of weight, ranges of equal weight in the
///   order sent: §12.5.4 notes that recipients may take the order of equally weighted ranges
///   as a preference, so `en, de` and `de, en` are not merged (nor is a set of ranges merged
///   with another that would select the same stored response: that is the origin's choice).
/// - Nothing is reordered when a range is listed twice (in any case): how its two weights
///   combine is not specified, and the order may decide it. Nothing is dropped either.
pub fn accept_language(items: &[Vec<u8>]) -> Option<Vec<u8>> {
    if items.len() > LANGUAGE_RANGES_MAX
        || items.iter().map(Vec::len).sum::<usize>() > LANGUAGE_BYTES_MAX
    {
        return None;
    }
    let mut all: [(&[u8], u16); LANGUAGE_RANGES_MAX] = [(&[], 0); LANGUAGE_RANGES_MAX];
    for (slot, item) in all.iter_mut().zip(items) {
        *slot = language_item(item)?;
    }
    let ranges = &mut all[..items.len()];
    let distinct = (1..ranges.len()).all(|i| {
        !ranges[..i]
            .iter()
            .any(|(r, _)| r.eq_ignore_ascii_case(ranges[i].0))
    });
    if distinct {
        // A stable insertion sort, by descending weight (at most LANGUAGE_RANGES_MAX items).
        for i in 1..ranges.len() {
            let mut j = i;
            while j > 0 && ranges[j - 1].1 < ranges[j].1 {
                ranges.swap(j - 1, j);
                j -= 1;
            }
        }
    }
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 2).sum());
    for (k, (range, q)) in ranges.iter().enumerate() {
        if k > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend(range.iter().map(u8::to_ascii_lowercase));
        if *q < 1000 {
            out.extend_from_slice(b";q=0");
            let digits = [q / 100, q / 10 % 10, q % 10];
            let used = digits.iter().rposition(|d| *d != 0).map_or(0, |i| i + 1);
            if used > 0 {
                out.push(b'.');
                out.extend(digits[..used].iter().map(|d| b'0' + *d as u8));
            }
        }
    }
    Some(out)
}

/// One `Accept-Language` item, `language-range [ weight ]` (RFC 9110 §12.5.4, §12.4.2): the
/// range and its weight in thousandths (1000 when absent); `None` when it is not one.
fn language_item(item: &[u8]) -> Option<(&[u8], u16)> {
    let (range, weight) = match item.iter().position(|b| *b == b';') {
        Some(at) => (trim_ows(&item[..at]), Some(trim_ows(&item[at + 1..]))),
        None => (item, None),
    };
    let basic = |r: &[u8]| {
        let mut subtags = r.split(|b| *b == b'-');
        let first = subtags.next().unwrap_or_default();
        (1..=8).contains(&first.len())
            && first.iter().all(u8::is_ascii_alphabetic)
            && subtags
                .all(|s| (1..=8).contains(&s.len()) && s.iter().all(u8::is_ascii_alphanumeric))
    };
    if range != b"*" && !basic(range) {
        return None;
    }
    let q = match weight {
        None => 1000,
        Some(w) => match w {
            [b'q' | b'Q', b'=', v @ ..] => qvalue(v)?,
            _ => return None,
        },
    };
    Some((range, q))
}

/// A `qvalue` (RFC 9110 §12.4.2: `0[.ddd]` or `1[.000]`) in thousandths.
fn qvalue(v: &[u8]) -> Option<u16> {
    let (first, frac) = match v {
        [d] => (*d, &[][..]),
        [d, b'.', f @ ..] if f.len() <= 3 && f.iter().all(u8::is_ascii_digit) => (*d, f),
        _ => return None,
    };
    let n = (0..3).fold(0u16, |n, k| {
        n * 10 + frac.get(k).map_or(0, |d| u16::from(d - b'0'))
    });
    match first {
        b'0' => Some(n),
        b'1' if n == 0 => Some(1000),
        _ => None,
    }
}

/// Whether the `Cache-Status` member `m` (a list member, trimmed) names the cache `name`
/// (RFC 9211 §2: a member's bare item, a token or a string, identifies its cache): a token
/// equal to `name`, or a string whose contents are `name`, compared byte for byte (tokens and
/// strings are case-sensitive, RFC 8941 §3.3.3, §3.3.4). An unterminated string is read to
/// its end.
pub fn member_named(m: &[u8], name: &[u8]) -> bool {
    let Some(s) = m.strip_prefix(b"\"") else {
        let end = m
            .iter()
            .position(|b| matches!(b, b';' | b' ' | b'\t'))
            .unwrap_or(m.len());
        return &m[..end] == name;
    };
    let mut want = name.iter();
    let mut i = 0;
    while i < s.len() {
        let mut b = s[i];
        if b == b'"' {
            break;
        }
        if b == b'\\' {
            i += 1;
            match s.get(i) {
                Some(c) => b = *c,
                None => break,
            }
        }
        if want.next() != Some(&b) {
            return false;
        }
        i += 1;
    }
    want.next().is_none()
}

/// A `Cache-Status` value without its members named `name` ([`member_named`]), the others
/// as they were, joined by `, `: `None` when it has none of those (empty when they were all).
pub fn without_members(v: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut dropped = false;
    for m in split_quoted(v) {
        let m = trim_ows(m);
        if m.is_empty() {
            continue;
        }
        if member_named(m, name) {
            dropped = true;
        } else {
            kept.push(m);
        }
    }
    dropped.then(|| kept.join(&b", "[..]))
}

/// `Vary` field names of a response, lower case; `None` for `*` (never matches).
pub fn vary_names<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<Vec<Box<[u8]>>> {
    let mut names: Vec<Box<[u8]>> = Vec::new();
    for v in values {
        for n in list_items(v) {
            if n == b"*" {
                return None;
            }
            let n = n.to_ascii_lowercase().into_boxed_slice();
            if !n.is_empty() && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    Some(names)
}

/// Header fields a cache never stores or replays: hop-by-hop ones and framing (§3.1).
pub fn unstorable_field(name: &[u8]) -> bool {
    // By length first, so that most names are compared with nothing: the hop-by-hop fields
    // (`crate::http::HOP_BY_HOP`, a test keeps the two in step), framing, Age and the
    // request id, and (§3.1) the fields that apply to one hop only.
    let is = |s: &[u8]| eq_ignore_case(name, s);
    match name.len() {
        2 => is(b"te"),
        3 => is(b"age"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        12 => is(b"x-request-id"),
        14 => is(b"content-length"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        25 => is(b"proxy-authentication-info"),
        _ => false,
    }
}

/// What a response field's name is to the cache's analysis of a response: the fields it reads
/// (§4.2: Cache-Control, Age, Date, Expires, Last-Modified; §4.1: Vary; §4.3.2: ETag), those
/// it treats apart (Set-Cookie, Cache-Status, Surrogate-Key) and those never stored
/// ([`unstorable_field`] but Age). [`field_name`] tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldName {
    CacheControl,
    Age,
    Date,
    Expires,
    LastModified,
    ETag,
    Vary,
    /// `Set-Cookie` or `Set-Cookie2`.
    SetCookie,
    CacheStatus,
    SurrogateKey,
    /// Hop-by-hop, framing or one hop's own (as [`unstorable_field`], Age aside).
    Unstorable,
    /// Anything else: stored as it is.
    Other,
}

impl FieldName {
    /// How many kinds there are (their values are `0..COUNT`, in the order above).
    pub const COUNT: usize = FieldName::Other as usize + 1;
}

/// The lengths of `names` modulo 64, as the bits of a word: a name whose length's bit is clear
/// is none of them (one whose bit is set may be another length's: compare it to know).
pub fn length_bits(names: &[Box<[u8]>]) -> u64 {
    names.iter().fold(0u64, |m, t| m | 1 << (t.len() % 64))
}

/// The [`FieldName`] of `name`, in any case. By length first (one jump), then the names of
/// that length compared in turn, the most common first: a length's compares run straight
/// through (a jump per first letter spread them over more code lines than they fill), and
/// most names are compared with at most three candidates, many with none.
// Inlined into its one caller's loop (`serve::analyze_response`, once per line of a stored
// response): a call per line costs more than most classifications.
#[inline(always)]
pub fn field_name(name: &[u8]) -> FieldName {
    use FieldName::*;
    let is = |s: &[u8]| is_name(name, s);
    match name.len() {
        2 if is(b"te") => Unstorable,
        3 if is(b"age") => Age,
        4 => {
            if is(b"date") {
                Date
            } else if is(b"etag") {
                ETag
            } else if is(b"vary") {
                Vary
            } else {
                Other
            }
        }
        7 => {
            if is(b"expires") {
                Expires
            } else if is(b"upgrade") || is(b"trailer") {
                Unstorable
            } else {
                Other
            }
        }
        10 => {
            if is(b"connection") || is(b"keep-alive") {
                Unstorable
            } else if is(b"set-cookie") {
                SetCookie
            } else {
                Other
            }
        }
        11 if is(b"set-cookie2") => SetCookie,
        12 => {
            if is(b"cache-status") {
                CacheStatus
            } else if is(b"x-request-id") {
                Unstorable
            } else {
                Other
            }
        }
        13 => {
            if is(b"cache-control") {
                CacheControl
            } else if is(b"last-modified") {
                LastModified
            } else if is(b"surrogate-key") {
                SurrogateKey
            } else {
                Other
            }
        }
        14 if is(b"content-length") => Unstorable,
        16 if is(b"proxy-connection") => Unstorable,
        17 if is(b"transfer-encoding") => Unstorable,
        18 if is(b"proxy-authenticate") => Unstorable,
        19 if is(b"proxy-authorization") => Unstorable,
        25 if is(b"proxy-authentication-info") => Unstorable,
        _ => Other,
    }
}

/// The first value of `name` among stored fields.
pub fn field<'a>(fields: impl Into<FieldsRef<'a>>, name: &[u8]) -> Option<&'a [u8]> {
    fields
        .into()
        .iter()
        .find(|(n, _)| eq_ignore_case(n, name))
        .map(|(_, v)| v)
}

/// Every value of `name` among stored fields, in order.
pub fn fields<'a>(
    fields: impl Into<FieldsRef<'a>>,
    name: &'a [u8],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields
        .into()
        .iter()
        .filter(move |(n, _)| eq_ignore_case(n, name))
        .map(|(_, v)| v)
}

/// `a == b`, for the short strings the cache compares on every request (a route's cache name):
/// up to 16 bytes in two overlapping loads of each, without a call to `bcmp`.
#[inline]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a == b,
        4..=7 => short_word(a) == short_word(b),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}

/// `a.eq_ignore_ascii_case(b)`, eight bytes at a time: the cache compares field names this
/// way several times per response (the standard one goes byte by byte).
#[inline]
pub fn eq_ignore_case(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() < 4 {
        return a.eq_ignore_ascii_case(b);
    }
    if a.len() < 8 {
        return lower8(short_word(a)) == lower8(short_word(b));
    }
    let mut i = 0;
    while i + 8 < a.len() {
        if lower8(word(a, i)) != lower8(word(b, i)) {
            return false;
        }
        i += 8;
    }
    // The last eight bytes (overlapping the previous word when the length is not a multiple
    // of eight).
    lower8(word(a, a.len() - 8)) == lower8(word(b, b.len() - 8))
}

/// [`eq_ignore_case`] where `lower` holds no upper-case letter (the field names and
/// directives this cache looks for are written so): a byte of `name` matches a letter of
/// `lower` when it is that letter with the 0x20 bit set (only the letter and its upper case
/// are), and any other byte of `lower` only as itself. Where `lower` is a literal, its words
/// and their letter masks are constants: one OR and one compare per eight bytes.
#[inline(always)]
pub fn is_name(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(!lower.iter().any(u8::is_ascii_uppercase));
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    let same = is_word;
    if n < 4 {
        return name
            .iter()
            .zip(lower)
            .all(|(a, b)| a.to_ascii_lowercase() == *b);
    }
    if n < 8 {
        return same(short_word(name), short_word(lower));
    }
    let mut i = 0;
    while i + 8 < n {
        if !same(word(name, i), word(lower, i)) {
            return false;
        }
        i += 8;
    }
    same(word(name, n - 8), word(lower, n - 8))
}

/// Whether the eight bytes `a` are those of `lower` (no upper-case letter in it) but for the
/// case of its letters, as [`is_name`] compares them.
#[inline(always)]
fn is_word(a: u64, lower: u64) -> bool {
    a | letters(lower) == lower
}

/// 0x20 in each byte of `x` that is a lower-case ASCII letter, 0 in the others (as
/// [`lower8`] finds the upper-case ones).
#[inline(always)]
fn letters(x: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low = x & !HIGH;
    // A byte's top bit set by adding 0x1f when its low seven bits are at least `a`, by
    // adding 0x05 when they are past `z` (neither carries into the next byte).
    let from_a = low + 0x1f1f_1f1f_1f1f_1f1f;
    let past_z = low + 0x0505_0505_0505_0505;
    (from_a & !past_z & !x & HIGH) >> 2
}

/// The eight bytes of `s` from `i`.
#[inline(always)]
fn word(s: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&s[i..i + 8]);
    u64::from_le_bytes(w)
}

/// The first four bytes of `s` (4 to 7 bytes long) and its last four (overlapping when fewer
/// than eight), as one word: names and directives this short are compared in one step.
#[inline(always)]
fn short_word(s: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..4].copy_from_slice(&s[..4]);
    w[4..].copy_from_slice(&s[s.len() - 4..]);
    u64::from_le_bytes(w)
}

/// The eight bytes of `x` with `A`..=`Z` lowered, as `u8::to_ascii_lowercase` lowers each
/// (other bytes, those past ASCII included, unchanged).
#[inline]
fn lower8(x: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Each byte's low seven bits; adding 0x3f sets a byte's top bit when they are at least
    // `A`, adding 0x25 when they are past `Z` (neither carries into the next byte).
    let low = x & !HIGH;
    let from_a = low + 0x3f3f_3f3f_3f3f_3f3f;
    let past_z = low + 0x2525_2525_2525_2525;
    let upper = from_a & !past_z & !x & HIGH;
    x | (upper >> 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `field_name` knows each name it classifies in any case, and takes a name one byte off
    /// (a letter's case bit on a non-letter, or another letter) for `Other`, as
    /// `unstorable_field` does for the fields never stored (Age aside).
    #[test]
    fn field_name_knows_its_names_in_any_case_and_no_other() {
        use FieldName::*;
        let names: [(&str, FieldName); 23] = [
            ("te", Unstorable),
            ("age", Age),
            ("date", Date),
            ("etag", ETag),
            ("vary", Vary),
            ("expires", Expires),
            ("trailer", Unstorable),
            ("upgrade", Unstorable),
            ("connection", Unstorable),
            ("keep-alive", Unstorable),
            ("set-cookie", SetCookie),
            ("set-cookie2", SetCookie),
            ("cache-status", CacheStatus),
            ("x-request-id", Unstorable),
            ("cache-control", CacheControl),
            ("last-modified", LastModified),
            ("surrogate-key", SurrogateKey),
            ("content-length", Unstorable),
            ("proxy-connection", Unstorable),
            ("transfer-encoding", Unstorable),
            ("proxy-authenticate", Unstorable),
            ("proxy-authorization", Unstorable),
            ("proxy-authentication-info", Unstorable),
        ];
        let kind_of = |n: &[u8]| {
            names
                .iter()
                .find(|(m, _)| m.as_bytes().eq_ignore_ascii_case(n))
                .map_or(Other, |(_, k)| *k)
        };
        for (n, kind) in names {
            assert_eq!(field_name(n.as_bytes()), kind, "{n}");
            assert_eq!(field_name(n.to_ascii_uppercase().as_bytes()), kind, "{n}");
            assert_eq!(
                unstorable_field(n.as_bytes()),
                kind == Unstorable || kind == Age
            );
            for i in 0..n.len() {
                for flip in [0x01, 0x20, 0x40] {
                    let mut b = n.as_bytes().to_vec();
                    b[i] ^= flip;
                    assert_eq!(field_name(&b), kind_of(&b), "{n} {i} {flip}");
                }
            }
        }
        for n in [
            "",
            "x",
            "server",
            "content-type",
            "accept-ranges",
            "location",
        ] {
            assert_eq!(field_name(n.as_bytes()), Other, "{n}");
        }
    }

    #[test]
    fn max_age_lines_of_any_length_read_as_delta_seconds() {
        for v in [
            "0",
            "7",
            "42",
            "360",
            "3600",
            "86400",
            "604800",
            "3153600",
            "31536000",
            "99999999",
            "100000000",
            "999999999",
            "2147483648",
            "99999999999999999999999",
            "00000000000000000000042",
        ] {
            let line = format!("max-age={v}");
            assert_eq!(
                lone_max_age(line.as_bytes()),
                delta_seconds(v.as_bytes()),
                "{line}"
            );
            let upper = format!("MAX-AGE={v}");
            assert_eq!(lone_max_age(upper.as_bytes()), delta_seconds(v.as_bytes()));
            // Any byte that is not a digit, anywhere among them, makes it no lone max-age.
            for at in 0..v.len() {
                for bad in [b'/', b':', b'a', b' ', b'\xff', 0x3a + 0x06, 0x30 - 0x06] {
                    let mut l = line.clone().into_bytes();
                    l[8 + at] = bad;
                    let trimmed_ok = (bad == b' ') && (at == v.len() - 1);
                    if !trimmed_ok {
                        assert_eq!(lone_max_age(&l), None, "{:?}", String::from_utf8_lossy(&l));
                    }
                }
            }
        }
    }

    /// The lines `add` reads without the scan read as the scan reads them.
    #[test]
    fn lines_read_without_the_scan_read_as_with_it() {
        for line in [
            "no-store",
            "NO-STORE",
            "No-Store",
            "no-storE",
            "max-age=60",
            "MAX-AGE=0",
            "max-age=3600 ",
            "no-store ",
            " no-store",
            "no-stor",
            "no-storex",
            "no_store",
        ] {
            let (mut fast, mut scanned) = (Directives::default(), Directives::default());
            fast.add(line.as_bytes());
            scanned.add_items(line.as_bytes());
            assert_eq!(fast, scanned, "{line:?}");
        }
        let mut d = Directives::default();
        d.add(b"no-store");
        assert!(d.no_store && !d.no_cache && d.max_age.is_none());
    }

    #[test]
    fn directives_rfc9111_5_2() {
        let mut d = Directives::default();
        d.add(b"max-age=60, s-maxage=\"30\", no-cache=\"set-cookie, x-a\", must-revalidate");
        d.add(b"max-age=5");
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(30));
        assert!(!d.no_cache);
        assert_eq!(d.no_cache_fields().len(), 2);
        assert!(d.must_revalidate);
        let mut d = Directives::default();
        d.add(b"max-age=abc, max-stale, min-fresh=99999999999999999999");
        assert_eq!(d.max_age, Some(0));
        assert_eq!(d.max_stale, Some(None));
        assert_eq!(d.min_fresh, Some(MAX_DELTA));
        // An invalid argument accepts the least staleness (§1.2.2, §5.2.1).
        for (line, stale, fresh) in [
            (
                &b"max-stale=abc, min-fresh=abc"[..],
                Some(Some(0)),
                Some(MAX_DELTA),
            ),
            (b"max-stale=, min-fresh", Some(Some(0)), Some(MAX_DELTA)),
            (
                b"max-stale=-1, min-fresh=1.5",
                Some(Some(0)),
                Some(MAX_DELTA),
            ),
            (b"max-stale=\"7\", min-fresh=\"3\"", Some(Some(7)), Some(3)),
        ] {
            let mut d = Directives::default();
            d.add(line);
            assert_eq!((d.max_stale, d.min_fresh), (stale, fresh), "{line:?}");
        }
        // No whitespace around "=" (§5.2): such a directive is ignored.
        let mut d = Directives::default();
        d.add(b"max-age =60, s-maxage= 5, no-cache");
        assert_eq!((d.max_age, d.s_maxage, d.no_cache), (None, None, true));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2048,
            failure_persistence: None,
            ..Default::default()
        })]

        /// `add` (one scan) reads every line as the split into items, each trimmed and cut at
        /// its first "=", reads it: lines of directives, commas, quotes, escapes, "=" and
        /// OWS in any order.
        #[test]
        fn add_reads_lines_as_items_do(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "max-age=5", "MAX-Age=7", "max-age=", "s-maxage", "no-cache", "private", "public",
                "no-store", "max-stale", "min-fresh=3", "x", "=", ",", ", ", "\"", "\"",
                "\\", "\\\"", " ", "\t", "60", "\"5\"", "a, b", "99999999999",
            ]), 0..12),
        ) {
            let line = parts.concat();
            let mut one = Directives::default();
            one.add(line.as_bytes());
            let mut items = Directives::default();
            items.add_by_items(line.as_bytes());
            proptest::prop_assert_eq!(one, items, "{:?}", line);
        }

        /// RFC 9110 §14.4: whatever an upstream sends as `Content-Range` (pieces of the
        /// grammar, digits past 2^64, any bytes), the parse never panics, and what it accepts
        /// is a range with `first <= last < complete` that reads back the same when written
        /// out.
        #[test]
        fn content_range_takes_only_whole_known_ranges(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "bytes ", "Bytes ", "bytes", " ", "-", "/", "*", "0", "5", "9", "10",
                "18446744073709551615", "18446744073709551616", "9999999999999999999", ",",
                "\t", "=", "+", "\u{1}",
            ]), 0..9),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
        ) {
            for v in [parts.concat().into_bytes(), noise] {
                if let Some(c) = content_range(&v) {
                    proptest::prop_assert!(c.first <= c.last && c.last < c.complete);
                    proptest::prop_assert!(c.bytes() >= 1);
                    let again = format!("bytes {}-{}/{}", c.first, c.last, c.complete);
                    proptest::prop_assert_eq!(content_range(again.as_bytes()), Some(c));
                }
            }
        }
    }

    /// RFC 9211 §2: a member names a cache by its token or string, compared exactly; the
    /// others stay as they were.
    #[test]
    fn cache_status_members_named_as_this_cache_are_found_and_dropped() {
        for (m, named) in [
            (&b"ringway"[..], true),
            (b"ringway; hit", true),
            (b"ringway;fwd=uri-miss", true),
            (b"\"ringway\"; hit", true),
            (b"\"ring\\way\"", true),
            (b"\"ringway", true),
            (b"Ringway; hit", false),
            (b"ringway-edge; hit", false),
            (b"\"ringway \"; hit", false),
            (b"edge; detail=ringway", false),
            (b"", false),
        ] {
            assert_eq!(
                member_named(m, b"ringway"),
                named,
                "{:?}",
                String::from_utf8_lossy(m)
            );
        }
        let w = |v: &[u8]| without_members(v, b"ringway");
        assert_eq!(w(b"edge; hit"), None);
        assert_eq!(w(b"ringway; hit"), Some(Vec::new()));
        assert_eq!(
            w(b"edge; detail=\"a, ringway\",ringway; hit , cdn"),
            Some(b"edge; detail=\"a, ringway\", cdn".to_vec())
        );
    }

    #[test]
    fn split_quoted_splits_as_a_byte_by_byte_scan_does() {
        // The scan `split_quoted` made before it skipped ahead to commas and quotes, kept here
        // as the reference.
        fn bytewise(v: &[u8]) -> Vec<&[u8]> {
            let (mut out, mut start, mut i, mut quoted) = (Vec::new(), 0, 0, false);
            while i < v.len() {
                let b = v[i];
                if quoted && b == b'\\' {
                    i += 2;
                    continue;
                }
                if b == b'"' {
                    quoted = !quoted;
                } else if b == b',' && !quoted {
                    out.push(&v[start..i]);
                    start = i + 1;
                }
                i += 1;
            }
            out.push(&v[start.min(v.len())..]);
            out
        }
        for v in [
            &b""[..],
            b",",
            b",,",
            b"max-age=60",
            b"max-age=60, public",
            b"no-cache=\"a, b\", private",
            b"x=\"a\\\",b\", y",
            b"x=\"unterminated, y",
            b"x=\"a\\",
            b"\"\\",
            b"a\\,b",
            b"\"\",\"\",",
        ] {
            assert_eq!(split_quoted(v).collect::<Vec<_>>(), bytewise(v), "{v:?}");
        }
    }

    #[test]
    fn eq_ignore_case_is_eq_ignore_ascii_case() {
        // Every byte value against every other, in each of a word's lanes and in the tail of
        // a length that is not a multiple of eight.
        for len in [1usize, 3, 4, 5, 7, 8, 13, 16] {
            for at in [0, 3, 4, 7, len - 1].into_iter().filter(|at| *at < len) {
                for x in 0..=255u8 {
                    for y in 0..=255u8 {
                        let mut a = vec![b'k'; len];
                        let mut b = a.clone();
                        a[at] = x;
                        b[at] = y;
                        assert_eq!(
                            eq_ignore_case(&a, &b),
                            a.eq_ignore_ascii_case(&b),
                            "{len} {at} {x} {y}"
                        );
                        if !y.is_ascii_uppercase() {
                            assert_eq!(
                                is_name(&a, &b),
                                a.eq_ignore_ascii_case(&b),
                                "{len} {at} {x} {y}"
                            );
                        }
                    }
                }
            }
        }
        for x in 0..=255u8 {
            let w = u64::from_le_bytes([x; 8]);
            assert_eq!(
                lower8(w),
                u64::from_le_bytes([x.to_ascii_lowercase(); 8]),
                "{x}"
            );
            let letter = if x.is_ascii_lowercase() { 0x20 } else { 0 };
            assert_eq!(letters(w), u64::from_le_bytes([letter; 8]), "{x}");
        }
        assert!(eq_ignore_case(b"Cache-Control", b"cache-control"));
        assert!(eq_ignore_case(b"CDN-Cache-Control", b"cdn-cache-control"));
        assert!(!eq_ignore_case(b"cache-control", b"cache-controm"));
        assert!(!eq_ignore_case(b"cache-control", b"cache-contro"));
        assert!(eq_ignore_case(b"", b""));
    }

    #[test]
    fn same_bytes_is_eq() {
        // Each length to past the two-word form, a byte changed in each place, and a length
        // apart.
        for len in 0..=20usize {
            let a: Vec<u8> = (0..len as u8).map(|i| b'a' + i).collect();
            assert!(same_bytes(&a, &a.clone()), "{len}");
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_bytes(&a, &b), "{len} {at}");
            }
            let mut longer = a.clone();
            longer.push(b'z');
            assert!(!same_bytes(&a, &longer), "{len}");
        }
    }

    /// A `Directives` is made, returned and dropped for every cached request (and two for a
    /// miss): small enough to be moved without a call to `memcpy` (at most 128 bytes), its rare
    /// field lists boxed, set only when a list names a field (so `names_fields` says whether
    /// either does).
    /// A line over the bound is not read in part (it might say `private` past it): it is
    /// `no-store` and `no-cache`, read by lines or by items, as a response's or a targeted
    /// field's value (RFC 9111 §3, RFC 9213 §2.2).
    #[test]
    fn a_directive_line_too_long_to_read_is_no_store_and_no_cache() {
        let mut long = b"max-age=60, ext=".to_vec();
        long.resize(MAX_DIRECTIVES_BYTES + 1, b'a');
        let mut by_line = Directives::default();
        by_line.add(&long);
        let mut by_items = Directives::default();
        by_items.add_by_items(&long);
        let targeted = Directives::targeted(&long).expect("read as refusing, not ignored");
        for d in [by_line, by_items, targeted] {
            assert!(d.no_store && d.no_cache, "{d:?}");
            assert_eq!(d.max_age, None, "{d:?}");
        }
        long.truncate(MAX_DIRECTIVES_BYTES);
        let mut d = Directives::default();
        d.add(&long);
        assert!(!d.no_store && !d.no_cache, "{d:?}");
        assert_eq!(d.max_age, Some(60));
    }

    #[test]
    fn directives_are_small_and_name_fields_only_when_a_list_does() {
        assert!(std::mem::size_of::<Directives>() <= 128);
        for (line, private, no_cache) in [
            (&b"max-age=60"[..], 0, 0),
            (b"private, no-cache", 0, 0),
            (b"private=\"\", no-cache=\" , \"", 0, 0),
            (b"private=\"x-a, X-B\"", 2, 0),
            (b"no-cache=\"x-a\", private=\"x-b\", private=x-c", 2, 1),
        ] {
            let mut d = Directives::default();
            d.add(line);
            let text = String::from_utf8_lossy(line);
            assert_eq!(d.private_fields().len(), private, "{text}");
            assert_eq!(d.no_cache_fields().len(), no_cache, "{text}");
            assert_eq!(d.names_fields(), private + no_cache > 0, "{text}");
            assert!(d
                .private_fields()
                .iter()
                .all(|f| !f.iter().any(u8::is_ascii_uppercase)));
            // A copy has fields of its own (`Directives` frees them itself): dropping one
            // leaves the other's.
            let copy = d.clone();
            assert_eq!(copy, d, "{text}");
            drop(d);
            assert_eq!(copy.private_fields().len(), private, "{text}");
            assert_eq!(copy.no_cache_fields().len(), no_cache, "{text}");
        }
    }

    #[test]
    fn targeted_fields_are_sf_dictionaries_rfc9213_2_1() {
        let d = Directives::targeted(b"max-age=60, must-revalidate").unwrap();
        assert_eq!(d.max_age, Some(60));
        assert!(d.must_revalidate);
        assert!(Directives::targeted(b"max-age=\"60\"").is_none());
        assert!(Directives::targeted(b"Max-Age=60").is_none());
        assert!(Directives::targeted(b"max-age=6,,").is_none());
        let d = Directives::targeted(b"no-store=?0, max-age=1").unwrap();
        assert!(!d.no_store);
        // Field names come as a String (or a Token); a number is no field list: the
        // directive then applies to the whole response.
        let d = Directives::targeted(b"private=\"x-a\", no-cache=x-b").unwrap();
        assert!(!d.private && !d.no_cache);
        assert_eq!(d.private_fields(), [Box::from(&b"x-a"[..])]);
        assert_eq!(d.no_cache_fields(), [Box::from(&b"x-b"[..])]);
        for v in [&b"private=1"[..], b"private=-1", b"private=1.5"] {
            let d = Directives::targeted(v).unwrap();
            assert!(d.private && !d.names_fields(), "{v:?}");
        }
        let d = Directives::targeted(b"no-cache=1, max-age=60").unwrap();
        assert!(d.no_cache && !d.names_fields());
        assert_eq!(d.max_age, Some(60));
    }

    #[test]
    fn http_dates_rfc9110_5_6_7() {
        let t = 784_111_777;
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date(b"Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(parse_http_date(b"0"), None);
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 25:49:37 GMT"), None);
        assert_eq!(parse_http_date(b"Sun Nov 06 08:49:37 1994"), Some(t));
        for bad in [
            &b"Sun, 06 Nov 1994 8:49:37 GMT"[..],
            b"Sun, 06  Nov 1994 08:49:37 GMT",
            b"Sun, 6 Nov 1994 08:49:37 GMT",
            b"Sun, 06-Nov-1994 08:49:37 GMT",
            b"Sunday, 06-Nov-1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49:37 UTC",
            b"Sun, 06 Nov 1994 08:49:37 utc",
            b"Sun Nov   6 08:49:37 1994",
            b"Sun, 06 Nov 1994 08:49:37 GMT x",
            b"Sun Nov  6 08:49:37 1994 GMT x y",
        ] {
            assert_eq!(
                parse_http_date(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let now = 1_700_000_000;
        assert_eq!(parse_http_date(&crate::date::http_date(now)), Some(now));
        // RFC 9111 §4.2: a cache matches the month and the zone case-insensitively.
        assert_eq!(parse_http_date(b"Sun, 06 NOV 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:37 gMT"), Some(t));
        assert_eq!(parse_http_date(b"Sunday, 06-nov-94 08:49:37 gmt"), Some(t));
        assert_eq!(parse_http_date(b"Sun NOV  6 08:49:37 1994"), Some(t));
    }

    #[test]
    fn unstorable_fields_rfc9111_3_1() {
        for n in crate::http::HOP_BY_HOP {
            assert!(unstorable_field(n), "{}", String::from_utf8_lossy(n));
            assert!(unstorable_field(&n.to_ascii_uppercase()));
        }
        for n in [
            &b"Content-Length"[..],
            b"AGE",
            b"x-request-id",
            b"Proxy-Authenticate",
            b"proxy-authentication-info",
            b"proxy-authorization",
        ] {
            assert!(unstorable_field(n), "{}", String::from_utf8_lossy(n));
        }
        for n in [
            &b"content-type"[..],
            b"date",
            b"etag",
            b"cache-control",
            b"tee",
            b"ag",
            b"set-cookie",
            b"x-request-ids",
            b"",
        ] {
            assert!(!unstorable_field(n), "{}", String::from_utf8_lossy(n));
        }
    }

    /// The memo of the last date answers only for the very same bytes: the same date twice,
    /// another date after it, a malformed one of the same length, and the epoch it starts with.
    #[test]
    fn http_date_memo_answers_only_for_the_same_bytes() {
        assert_eq!(parse_date_forms(b"Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        for _ in 0..2 {
            assert_eq!(
                parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"),
                Some(784_111_777)
            );
            assert_eq!(
                parse_http_date(b" Sun, 06 Nov 1994 08:49:37 GMT "),
                Some(784_111_777)
            );
        }
        assert_eq!(
            parse_http_date(b"Sun, 06 Nov 1994 08:49:38 GMT"),
            Some(784_111_778)
        );
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:3X GMT"), None);
        assert_eq!(
            parse_http_date(b"Sun, 06 Nov 1994 08:49:38 GMT"),
            Some(784_111_778)
        );
        assert_eq!(parse_http_date(b"Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date(&[0; IMF_FIXDATE_LEN]), None);
    }

    #[test]
    fn content_range_rfc9110_14_4_is_one_whole_known_range_or_none() {
        let cr = |f, l, c| {
            Some(ContentRange {
                first: f,
                last: l,
                complete: c,
            })
        };
        assert_eq!(content_range(b"bytes 0-4/10"), cr(0, 4, 10));
        assert_eq!(content_range(b"Bytes 5-9/10"), cr(5, 9, 10));
        assert_eq!(content_range(b" bytes 9-9/10 "), cr(9, 9, 10));
        assert_eq!(content_range(b"bytes 0-4/10").map(|c| c.bytes()), Some(5));
        assert_eq!(
            content_range(b"bytes 0-9999999999999999998/9999999999999999999").map(|c| c.bytes()),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b"bytes 0-4/*"[..],
            b"bytes */10",
            b"bytes 5-4/10",
            b"bytes 0-10/10",
            b"bytes 0-4/0",
            b"items 0-4/10",
            b"bytes=0-4/10",
            b"bytes  0-4/10",
            b"bytes 0 -4/10",
            b"bytes 0-4 /10",
            b"bytes -4/10",
            b"bytes 0-/10",
            b"bytes 0-4/",
            b"bytes 0/4-10",
            b"bytes 0-4/10/12",
            b"bytes 0-4-5/10",
            b"bytes +0-4/10",
            b"bytes 0-4/99999999999999999999",
            b"bytes 0-4/18446744073709551616",
            b"bytes 0-4/18446744073709551615",
            b"bytes 0-1,3-4/10",
            b"bytes",
            b"",
        ] {
            assert_eq!(
                content_range(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn ranges_rfc9110_14_1_2() {
        assert_eq!(byte_range(b"bytes=0-4", 10), RangeAnswer::Part(0, 4));
        assert_eq!(byte_range(b"Bytes=0-4", 10), RangeAnswer::Part(0, 4));
        assert_eq!(byte_range(b"BYTES=-3", 10), RangeAnswer::Part(7, 9));
        assert_eq!(byte_range(b"items=0-4", 10), RangeAnswer::Full);
        assert_eq!(byte_range(b"bytes=5-", 10), RangeAnswer::Part(5, 9));
        assert_eq!(byte_range(b"bytes=-3", 10), RangeAnswer::Part(7, 9));
        assert_eq!(byte_range(b"bytes=-30", 10), RangeAnswer::Part(0, 9));
        assert_eq!(byte_range(b"bytes=10-", 10), RangeAnswer::Unsatisfiable);
        assert_eq!(byte_range(b"bytes=0-1,3-4", 10), RangeAnswer::Full);
        assert_eq!(byte_range(b"items=0-1", 10), RangeAnswer::Full);
        assert_eq!(byte_range(b"bytes=5-2", 10), RangeAnswer::Full);
        assert_eq!(
            byte_range(b"bytes=99999999999999999999999-", 10),
            RangeAnswer::Full
        );
    }

    #[test]
    fn etags_and_vary() {
        assert!(weak_match(b"W/\"a\"", b"\"a\""));
        assert!(!strong_match(b"W/\"a\"", b"\"a\""));
        assert!(none_match_hits(b"\"x\", W/\"a\"", Some(b"\"a\"")));
        assert!(!none_match_hits(b"\"x\"", Some(b"\"a\"")));
        let v = vary_value(
            b"accept-encoding",
            &mut [&b"gzip, br;q=1"[..], b"identity;q=0, GZIP, zstd;q=0"].into_iter(),
        );
        assert_eq!(v, b"br,gzip,identity;q=0");
        let v = vary_value(
            b"accept-encoding",
            &mut [&b"*, Gzip;q=0, br;q=0.5"[..]].into_iter(),
        );
        assert_eq!(v, b"*,br,gzip;q=0");
        // RFC 9110 §12.4.2: a weight that is no qvalue is no refusal; kept as sent.
        let v = vary_value(
            b"accept-encoding",
            &mut [&b"GZIP;q=, br;Q=00, x;q=0., y;q=1., z;level=1"[..]].into_iter(),
        );
        assert_eq!(v, b"br;q=00,gzip;q=,y,z;level=1");
        let v = vary_value(b"accept-encoding", &mut [&b"gzip;q=0;q=1"[..]].into_iter());
        assert_eq!(v, b"gzip;q=0;q=1");
        // §4.1: absent matches only absent; empty and all-refused are the empty set.
        let absent = vary_value(b"accept-encoding", &mut std::iter::empty());
        assert_eq!(absent, VARY_ABSENT);
        let empty = vary_value(b"accept-encoding", &mut [&b""[..]].into_iter());
        assert_eq!(empty, b"");
        let refused = vary_value(b"accept-encoding", &mut [&b"gzip;q=0"[..]].into_iter());
        assert_eq!(refused, b"");
        assert_eq!(vary_value(b"x-a", &mut std::iter::empty()), VARY_ABSENT);
        assert_eq!(vary_value(b"x-a", &mut [&b" "[..]].into_iter()), b"");
        assert_eq!(
            vary_names([&b"Accept, accept"[..]].into_iter())
                .unwrap()
                .len(),
            1
        );
        assert!(vary_names([&b"a, *"[..]].into_iter()).is_none());
    }

    /// RFC 9111 §4.1 with RFC 9110 §12.5.4: `Accept-Language` values of one meaning share a
    /// form; order among equal weights, `q=0` ranges, repeated ranges and invalid values are
    /// kept as they were.
    #[test]
    fn accept_language_is_normalised_only_where_the_meaning_is_the_same() {
        let lang = |lines: &[&str]| {
            let v = vary_value(b"Accept-Language", &mut lines.iter().map(|l| l.as_bytes()));
            String::from_utf8(v).expect("ASCII")
        };
        let cases: &[(&[&str], &str)] = &[
            (&["EN-gb, De"], "en-gb, de"),
            (&["de;q=0.5, en"], "en, de;q=0.5"),
            (&["en", "de;Q=0.50"], "en, de;q=0.5"),
            (
                &[" fr ; q=0.125 ,en;q=1.000, , *;q=0"],
                "en, fr;q=0.125, *;q=0",
            ),
            (&["en;q=0.0, de;q=0.100"], "de;q=0.1, en;q=0"),
            (&["de, en"], "de, en"),
            (
                &["fr;q=0.5, de;q=0.5, en;q=0.5"],
                "fr;q=0.5, de;q=0.5, en;q=0.5",
            ),
            (&["*, fr;q=0"], "*, fr;q=0"),
            (
                &["zh-Hant-TW, x-klingon;q=0.3"],
                "zh-hant-tw, x-klingon;q=0.3",
            ),
            // A range listed twice: nothing reordered.
            (&["en;q=0.5, EN, de"], "en;q=0.5, en, de"),
            // Invalid: compared as sent (items trimmed), in its own case.
            (&["EN;q=0.5;x=1, De"], "EN;q=0.5;x=1, De"),
            (&["de;q=0.5, en_US"], "de;q=0.5, en_US"),
            (&["de;q=.5, en"], "de;q=.5, en"),
            (&["de;q=1.5, en"], "de;q=1.5, en"),
            (&["de;q=0.5000, en"], "de;q=0.5000, en"),
            (&["de;q = 0.5, en"], "de;q = 0.5, en"),
            (&["de-, en"], "de-, en"),
            (&["abcdefghi, en"], "abcdefghi, en"),
            (&["*-CH, en"], "*-CH, en"),
            (&[""], ""),
        ];
        for (lines, want) in cases {
            assert_eq!(lang(lines), *want, "{lines:?}");
        }
        assert_eq!(lang(&[]).as_bytes(), VARY_ABSENT);
        // Over the caps: as sent.
        let many = vec!["EN;q=0.5, De"; LANGUAGE_RANGES_MAX / 2 + 1].join(", ");
        assert_eq!(lang(&[&many]), many);
        let long = format!("EN;q=0.5, De-{}", vec!["abcdefgh"; 120].join("-"));
        assert!(long.len() > LANGUAGE_BYTES_MAX);
        assert_eq!(lang(&[&long]), long);
        let fits = vec!["EN;q=0.5, De"; LANGUAGE_RANGES_MAX / 2].join(", ");
        assert!(lang(&[&fits]).starts_with("en;q=0.5, de, "));
    }

    /// Every directive a targeted field keeps the last member of is one `directive` knows.
    #[test]
    fn targeted_known_directives_all_have_an_effect() {
        for name in TARGETED_KNOWN {
            let mut v = name.to_vec();
            v.extend_from_slice(b"=1");
            let d = Directives::targeted(&v).expect("valid");
            assert_ne!(
                d,
                Directives::default(),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }
}
