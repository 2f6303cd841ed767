//! Property tests for the response cache's parsers of hostile bytes: entries and purges read
//! back from Redis (`cache::redis`), and the RFC 9111 rules of `cache::policy` (cache
//! directives and their targeted form, HTTP dates, Vary, delta-seconds and age arithmetic,
//! byte ranges served from a stored response).
//!
//! - Arbitrary bytes never panic, and an entry read from Redis allocates no more than its
//!   bytes justify.
//! - What ringway writes, it reads back the same; every truncation of an entry is refused,
//!   and a mutated entry is refused or is one ringway could have written (re-encodes to the
//!   same bytes).
//! - Dates round trip through `crate::date`'s formatter in all three RFC 9110 §5.6.7 forms;
//!   a date that is accepted is a real calendar date.
//! - Directive lists mean the same split across lines, in any case, with any OWS; numbers
//!   saturate at 2^31 (RFC 9111 §1.2.2); freshness arithmetic never overflows.
//!
//! The default run is small enough for CI (64 cases per property). A longer run:
//! `PROPTEST_CASES=20000 cargo test --release --test cache_props`.

mod prop_support;

use std::cell::Cell;

use bytes::Bytes;
use proptest::prelude::*;

use ringway::cache::fields::Fields;
use ringway::cache::policy::{
    byte_range, delta_seconds, field_name, none_match_hits, parse_http_date, strong_match,
    unstorable_field, vary_names, vary_value, weak_match, Directives, FieldName, RangeAnswer,
    MAX_DELTA, VARY_ABSENT,
};
use ringway::cache::redis::{decode_heard, decode_purge, encode, encode_heard, encode_purge};
use ringway::cache::{Object, Purge, PurgeTarget, Timing};

#[global_allocator]
static GLOBAL: prop_support::ThreadBytes = prop_support::ThreadBytes;

fn bytes_of(n: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..n)
}

/// One edit of `b` at `at`: flip bits, set a byte, delete one, insert one, or cut there.
fn mutate(mut b: Vec<u8>, at: usize, op: u8, byte: u8) -> Vec<u8> {
    if b.is_empty() {
        return vec![byte];
    }
    let i = at % b.len();
    match op % 5 {
        0 => b[i] ^= byte.max(1),
        1 => b[i] = byte,
        2 => {
            b.remove(i);
        }
        3 => b.insert(i, byte),
        _ => b.truncate(i),
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Entries in Redis (`cache::redis::encode` / `decode`).

/// Bytes of a header value or reason phrase as ringway stores them: HTAB, SP, VCHAR and
/// obs-text (RFC 9110 §5.5, RFC 9112 §4; the parser of upstream responses lets no other
/// control byte through).
fn text(n: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter(
            "a field-value byte",
            |b| matches!(b, b'\t' | b' ' | 0x21..=0x7E | 0x80..=0xFF),
        ),
        0..n,
    )
}

/// A field value without quoted strings (an unbalanced quote would span lines).
fn unquoted(n: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no CR, LF, NUL, quote", |b| {
            !matches!(b, b'\r' | b'\n' | 0 | b'"' | b'\\')
        }),
        0..n,
    )
}

fn timing() -> impl Strategy<Value = Timing> {
    // Mostly the values a gateway meets, sometimes any u64 (an entry from a hostile Redis).
    let secs = || {
        prop_oneof![
            4 => 0u64..100_000,
            2 => 1_600_000_000u64..1_900_000_000,
            1 => Just(MAX_DELTA),
            2 => any::<u64>(),
        ]
    };
    (
        (secs(), secs(), secs(), secs(), secs()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |((response_time, initial_age, lifetime, swr, sie), no_stale, always_validate)| {
                Timing {
                    response_time,
                    initial_age,
                    lifetime,
                    swr,
                    sie,
                    no_stale,
                    always_validate,
                }
            },
        )
}

fn object() -> impl Strategy<Value = Object> {
    // Names ringway stores: no framing or hop-by-hop field (RFC 9111 §3.1).
    let name = "[a-z0-9!#$%&'*+.^_`|~-]{1,12}"
        .prop_filter("storable", |n: &String| !unstorable_field(n.as_bytes()));
    let field = (name, text(20));
    (
        (200u16..600).prop_filter("stored", |s| *s != 206 && *s != 304),
        text(12),
        proptest::collection::vec(field, 0..6),
        bytes_of(64),
        timing(),
        bytes_of(30),
        proptest::collection::vec(bytes_of(8), 0..4),
        proptest::collection::vec((bytes_of(16), bytes_of(12)), 0..3),
    )
        .prop_map(
            |(status, reason, fields, body, t, url, tags, vary)| Object {
                status,
                reason: reason.into(),
                fields: Fields::from_pairs(fields.iter().map(|(n, v)| (n.as_bytes(), &v[..])))
                    .expect("fits"),
                body: body.into(),
                t,
                url: url.into(),
                tags: tags.into_iter().map(Vec::into_boxed_slice).collect(),
                vary: vary
                    .into_iter()
                    .map(|(n, v)| (n.into_boxed_slice(), v))
                    .collect(),
                invalid: Cell::new(false),
                born: Cell::new(0),
            },
        )
}

/// Everything an entry carries, in a form that compares.
type Parts = (
    u16,
    Vec<u8>,
    Vec<(Vec<u8>, Vec<u8>)>,
    Vec<u8>,
    [u64; 5],
    [bool; 2],
    Vec<u8>,
    Vec<Vec<u8>>,
    Vec<(Vec<u8>, Vec<u8>)>,
);

fn parts(o: &Object) -> Parts {
    let t = &o.t;
    (
        o.status,
        o.reason.to_vec(),
        o.fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
        o.body.to_vec(),
        [t.response_time, t.initial_age, t.lifetime, t.swr, t.sie],
        [t.no_stale, t.always_validate],
        o.url.to_vec(),
        o.tags.iter().map(|t| t.to_vec()).collect(),
        o.vary
            .iter()
            .map(|(n, v)| (n.to_vec(), v.clone()))
            .collect(),
    )
}

/// The freshness arithmetic of an object, at `now`: no overflow (debug builds panic on one),
/// and `ttl` agrees with `is_fresh` (RFC 9111 §4.2: fresh while the lifetime exceeds the age).
fn check_timing(o: &Object, now: u64) {
    assert!(o.t.age(now) >= o.t.initial_age, "age");
    let ttl = o.ttl(now);
    assert!(ttl > i64::MIN, "a ttl the cache negates");
    assert_eq!(o.is_fresh(now), ttl > 0, "ttl {ttl} vs is_fresh, {:?}", o.t);
    let _ = o.weight();
}

/// `decode` on `b`, with the invariants every answer keeps: allocation bounded by the input,
/// and an entry accepted is one `encode_heard` writes as these very bytes, with the place in
/// the purge log it was read with (an entry of the format before, `RWC2`, is the same bytes
/// without the place).
fn check_decode(b: &[u8]) -> Option<Object> {
    let input = Bytes::copy_from_slice(b);
    let (d, bytes) = prop_support::allocated_by(|| decode_heard(&input));
    // Per byte of entry, at most a field's span (16 bytes per 8 bytes of lengths) or a copy
    // of a tag or a Vary value.
    let bound = 256 + 16 * b.len();
    assert!(
        bytes <= bound,
        "{bytes} bytes allocated for a {} byte entry",
        b.len()
    );
    if let Some((o, heard)) = &d {
        let mut again = encode_heard(o, *heard);
        if b.starts_with(b"RWC2") {
            again[..4].copy_from_slice(b"RWC2");
            again.drain(7..23);
        }
        assert_eq!(again, b, "an accepted entry is canonical");
        assert!(
            !o.fields.iter().any(|(n, _)| unstorable_field(n)),
            "no framing or hop-by-hop field"
        );
        assert!(
            (200..600).contains(&o.status) && o.status != 206 && o.status != 304,
            "a status the cache stores"
        );
        check_timing(o, o.t.response_time.saturating_add(1));
    }
    d.map(|(o, _)| o)
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn entry_arbitrary_bytes_never_panic(b in bytes_of(300)) {
        check_decode(&b);
        // Behind each tag the reader takes: this build's and the one before.
        for tag in [b"RWC3", b"RWC2"] {
            let mut tagged = tag.to_vec();
            tagged.extend_from_slice(&b);
            check_decode(&tagged);
        }
    }

    #[test]
    fn entries_round_trip(o in object()) {
        let enc = encode(&o);
        let d = check_decode(&enc).expect("what ringway writes, it reads");
        prop_assert_eq!(parts(&d), parts(&o));
    }

    #[test]
    fn entry_every_truncation_is_refused(o in object()) {
        let enc = encode(&o);
        for n in 0..enc.len() {
            prop_assert!(check_decode(&enc[..n]).is_none(), "prefix {}", n);
        }
    }

    #[test]
    fn entry_mutations_are_refused_or_canonical(
        o in object(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    ) {
        let mut b = encode(&o);
        for (at, op, byte) in edits {
            b = mutate(b, at, op, byte);
        }
        check_decode(&b);
    }

    /// A field ringway never stores (framing, hop-by-hop, Age), in any case, makes the entry
    /// a miss: the answer's own framing would meet it.
    #[test]
    fn entry_with_a_framing_field_is_refused(
        o in object(),
        name in prop::sample::select(&["content-length", "transfer-encoding", "connection", "te", "trailer", "upgrade", "keep-alive", "age", "proxy-authenticate"][..]),
        mask in any::<u64>(),
        at in any::<prop::sample::Index>(),
    ) {
        let mut o = o;
        let i = at.index(o.fields.len() + 1);
        let bad = recase(name, mask);
        let mut lines: Vec<(&[u8], &[u8])> = o.fields.iter().collect();
        lines.insert(i, (bad.as_bytes(), b"1"));
        o.fields = Fields::from_pairs(lines).expect("fits");
        prop_assert!(check_decode(&encode(&o)).is_none());
    }

    /// A status the cache never stores (1xx, 206, 304, 600 and up) makes the entry a miss.
    #[test]
    fn entry_with_a_status_never_stored_is_refused(
        o in object(),
        status in prop_oneof![0u16..200, Just(206u16), Just(304u16), 600u16..=u16::MAX],
    ) {
        let mut o = o;
        o.status = status;
        prop_assert!(check_decode(&encode(&o)).is_none());
    }

    /// Counts and lengths that promise more than the entry holds reserve nothing for it.
    #[test]
    fn entry_count_lies_allocate_nothing_for_them(
        o in object(),
        which in 0usize..4,
        lie in prop_oneof![Just(512u32), Just(u32::MAX), 1u32..600],
    ) {
        let mut o = o;
        o.fields = Fields::default();
        o.tags.clear();
        o.vary.clear();
        let enc = encode(&o);
        // Offsets of the counts: magic, status, flags, the writer's place in the purge log
        // (RWC3: two u64), five timings, the reason.
        let fields_at = 4 + 2 + 1 + 16 + 40 + 4 + o.reason.len();
        let url_end = fields_at + 4 + 4 + o.url.len();
        let at = [fields_at, url_end, url_end + 4, url_end + 8][which];
        let mut b = enc.clone();
        b[at..at + 4].copy_from_slice(&lie.to_be_bytes());
        // `check_decode` bounds what is allocated; a count past any entry's is refused.
        let d = check_decode(&b);
        prop_assert!(lie < 600 || d.is_none());
    }

    /// Freshness arithmetic over any timing (RFC 9111 §4.2.3), read from any Redis.
    #[test]
    fn freshness_arithmetic_never_overflows(t in timing(), now in prop_oneof![any::<u64>(), 1_600_000_000u64..1_900_000_000], invalid in any::<bool>()) {
        let o = Object {
            status: 200,
            reason: Bytes::new(),
            fields: Fields::default(),
            body: Bytes::new(),
            t,
            url: Bytes::new(),
            tags: Vec::new(),
            vary: Vec::new(),
            invalid: Cell::new(invalid),
            born: Cell::new(0),
        };
        if invalid {
            prop_assert!(!o.is_fresh(now));
            prop_assert!(o.ttl(now) <= 0 && o.ttl(now) > i64::MIN);
        } else {
            check_timing(&o, now);
        }
        o.invalid.set(false);
        check_timing(&o, now);
    }
}

// ---------------------------------------------------------------------------------------------
// Purges on the channel (`encode_purge` / `decode_purge`).

fn purge() -> impl Strategy<Value = Purge> {
    let target = prop_oneof![
        bytes_of(40).prop_map(PurgeTarget::Url),
        bytes_of(40).prop_map(PurgeTarget::Prefix),
        bytes_of(40).prop_map(PurgeTarget::Tag),
        Just(PurgeTarget::All),
    ];
    (target, any::<bool>()).prop_map(|(target, soft)| Purge { target, soft })
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn purge_arbitrary_bytes_never_panic(b in bytes_of(80)) {
        if let Some(p) = decode_purge(&b) {
            prop_assert_eq!(encode_purge(&p), b, "an accepted purge is canonical");
        }
    }

    #[test]
    fn purges_round_trip_and_mutations_are_canonical(
        p in purge(),
        at in any::<usize>(), op in any::<u8>(), byte in any::<u8>(),
    ) {
        let enc = encode_purge(&p);
        prop_assert_eq!(decode_purge(&enc), Some(p));
        for n in 0..2.min(enc.len()) {
            prop_assert!(decode_purge(&enc[..n]).is_none());
        }
        let m = mutate(enc, at, op, byte);
        if let Some(q) = decode_purge(&m) {
            prop_assert_eq!(encode_purge(&q), m);
        }
    }
}

#[test]
fn purge_messages_are_bounded() {
    let mut b = vec![b'u', 0];
    b.resize(64 * 1024, b'x');
    assert!(decode_purge(&b).is_some());
    b.push(b'x');
    assert!(decode_purge(&b).is_none());
}

// ---------------------------------------------------------------------------------------------
// Delta-seconds and directives (RFC 9111 §1.2.2, §5.2; RFC 9213).

/// A number as a string of decimal digits, sometimes far past u64.
fn digits() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..100_000).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[0-9]{1,40}",
    ]
}

/// The value of a decimal string, saturated at 2^31 (RFC 9111 §1.2.2), computed apart.
fn saturated(d: &str) -> u64 {
    let d = d.trim_start_matches('0');
    if d.len() > 10 {
        return MAX_DELTA;
    }
    d.parse::<u64>().unwrap_or(0).min(MAX_DELTA)
}

const NUMERIC: [&str; 5] = [
    "max-age",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
    "min-fresh",
];
const FLAGS: [&str; 9] = [
    "no-store",
    "no-cache",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "must-understand",
    "only-if-cached",
    "max-stale",
];

/// One directive: a known numeric one with digits (maybe quoted), a known flag, or one this
/// cache does not know (ignored, §5.2.3).
fn directive() -> impl Strategy<Value = String> {
    prop_oneof![
        (prop::sample::select(&NUMERIC[..]), digits(), any::<bool>()).prop_map(|(n, d, q)| {
            if q {
                format!("{n}=\"{d}\"")
            } else {
                format!("{n}={d}")
            }
        }),
        prop::sample::select(&FLAGS[..]).prop_map(str::to_string),
        ("x-[a-z]{1,6}", prop::option::of("[a-z0-9]{1,6}")).prop_map(|(n, v)| match v {
            Some(v) => format!("{n}={v}"),
            None => n,
        }),
    ]
}

fn directives_of(lines: &[&str]) -> Directives {
    let mut d = Directives::default();
    for l in lines {
        d.add(l.as_bytes());
    }
    d
}

/// Upper-cases the ASCII letters at the positions `mask` picks.
fn recase(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn delta_seconds_saturate_at_2_31(d in digits(), quoted in any::<bool>(), ows in "[ \t]{0,2}") {
        let v = if quoted { format!("{ows}\"{d}\"{ows}") } else { format!("{ows}{d}{ows}") };
        prop_assert_eq!(delta_seconds(v.as_bytes()), Some(saturated(&d)));
        let mut d2 = Directives::default();
        d2.add(format!("max-age={d}, s-maxage=\"{d}\"").as_bytes());
        prop_assert_eq!(d2.max_age, Some(saturated(&d)));
        prop_assert_eq!(d2.s_maxage, Some(saturated(&d)));
    }

    #[test]
    fn directives_arbitrary_bytes_never_panic(b in bytes_of(200)) {
        let mut d = Directives::default();
        d.add(&b);
        let _ = Directives::targeted(&b);
        let _ = delta_seconds(&b);
    }

    /// RFC 9110 §5.3: a list split across field lines means what it means on one line;
    /// directive names are case-insensitive (§5.2) and OWS around commas is not significant.
    #[test]
    fn directive_lists_mean_the_same_however_written(
        list in proptest::collection::vec(directive(), 1..8),
        cuts in proptest::collection::vec(any::<bool>(), 8),
        mask in any::<u64>(),
        ows in proptest::collection::vec("[ \t]{0,2}", 8),
    ) {
        let one = list.join(", ");
        let whole = directives_of(&[&one]);
        // The same items, with other OWS, split into several lines where `cuts` says.
        let mut lines: Vec<String> = vec![String::new()];
        for (i, item) in list.iter().enumerate() {
            let last = lines.last_mut().expect("one line at least");
            if !last.is_empty() {
                last.push_str(&ows[i]);
                last.push(',');
                last.push_str(&ows[(i + 1) % 8]);
            }
            // Names change case; quoted values and digits do not have letters to change.
            let (name, value) = item.split_once('=').map_or((&item[..], None), |(n, v)| (n, Some(v)));
            last.push_str(&recase(name, mask.rotate_left(i as u32)));
            if let Some(v) = value {
                last.push('=');
                last.push_str(v);
            }
            if cuts[i] {
                lines.push(String::new());
            }
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        prop_assert_eq!(directives_of(&refs), whole.clone());
        // The first of a directive given twice wins (§4.2.1): the list twice is the list once.
        prop_assert_eq!(directives_of(&[&one, &one]), whole);
    }

    /// RFC 9213 §2.1: a targeted field is a Structured Fields Dictionary; where it is also a
    /// valid `Cache-Control` list (sf-integers, bare keys) it means the same, except that of
    /// a key given twice the last member counts (RFC 8941 §3.2); `?0` is absence, `?1`
    /// presence; an upper-case key or a string for a number voids the whole field.
    #[test]
    fn targeted_dictionaries_mean_what_cache_control_means(
        items in proptest::collection::vec(
            (prop::sample::select([&NUMERIC[..4], &FLAGS[..8]].concat()), 0u64..1_000_000_000_000_000, 0u8..4),
            1..6,
        ),
    ) {
        let mut sf = Vec::new();
        let mut cc = Vec::new();
        for (i, (name, n, form)) in items.iter().enumerate() {
            let numeric = NUMERIC.contains(name);
            let (member, directive) = match (numeric, form) {
                (true, 0) => (format!("{name}=?0"), None),
                (true, _) => (format!("{name}={n}"), Some(format!("{name}={n}"))),
                (false, 0) => (format!("{name}=?0"), None),
                (false, 1) => (format!("{name}=?1"), Some(name.to_string())),
                (false, _) => (format!("{name};p=1"), Some(name.to_string())),
            };
            sf.push(member);
            // Only the last member of a key counts.
            if !items[i + 1..].iter().any(|(later, _, _)| later == name) {
                cc.extend(directive);
            }
        }
        let t = Directives::targeted(sf.join(", ").as_bytes());
        prop_assert_eq!(t, Some(directives_of(&[&cc.join(", ")])), "{:?}", sf);
        let upper = sf.join(", ").to_ascii_uppercase();
        prop_assert_eq!(Directives::targeted(upper.as_bytes()), None);
        let quoted = format!("{}, max-age=\"1\"", sf.join(", "));
        prop_assert_eq!(Directives::targeted(quoted.as_bytes()), None);
    }
}

/// Found by `targeted_dictionaries_mean_what_cache_control_means`: the first member of a
/// key given twice counted, as in `Cache-Control`, where a Structured Fields Dictionary
/// keeps the last (RFC 8941 §3.2), `?0` included.
#[test]
fn targeted_duplicate_keys_keep_the_last_member() {
    let d = Directives::targeted(b"max-age=10, max-age=20").expect("valid");
    assert_eq!(d.max_age, Some(20));
    let d = Directives::targeted(b"no-store, no-store=?0, public").expect("valid");
    assert!(!d.no_store && d.public);
    let d = Directives::targeted(b"private=?0, private").expect("valid");
    assert!(d.private);
}

// ---------------------------------------------------------------------------------------------
// HTTP dates (RFC 9110 §5.6.7), against the formatter of `ringway::date`.

/// The last second of 9999: the last a four-digit year can write.
const LAST_SECOND: u64 = 253_402_300_799;

const DAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

fn imf(secs: u64) -> String {
    String::from_utf8(ringway::date::http_date(secs).to_vec()).expect("ASCII")
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` as its parts: day name, day, month, year, time.
fn imf_parts(secs: u64) -> (String, String, String, String, String) {
    let s = imf(secs);
    (
        s[0..3].into(),
        s[5..7].into(),
        s[8..11].into(),
        s[12..16].into(),
        s[17..25].into(),
    )
}

fn this_year() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    imf_parts(now).3.parse().expect("a year")
}

proptest! {
    #![proptest_config(prop_support::config())]

    /// Every second the formatter writes (1970 to 9999) parses back to itself, in the
    /// IMF-fixdate and asctime forms, and in the rfc850 form where its two-digit year is
    /// read as this year's window (RFC 9110 §5.6.7: not more than 50 years ahead).
    #[test]
    fn dates_round_trip_in_the_three_forms(
        secs in prop_oneof![0u64..=LAST_SECOND, 0u64..4_102_444_800, Just(0u64), Just(LAST_SECOND)],
        pad in "[ \t]{0,2}",
    ) {
        let s = imf(secs);
        prop_assert_eq!(parse_http_date(s.as_bytes()), Some(secs), "{}", s);
        prop_assert_eq!(parse_http_date(format!("{pad}{s}{pad}").as_bytes()), Some(secs));
        prop_assert_eq!(parse_http_date(s.to_ascii_uppercase().as_bytes()), Some(secs));
        let (_, d, mo, y, t) = imf_parts(secs);
        let day = DAYS[(secs / 86_400 % 7) as usize];
        let asctime = format!(
            "{} {mo} {:>2} {t} {y}",
            &day[..3],
            d.trim_start_matches('0')
        );
        prop_assert_eq!(parse_http_date(asctime.as_bytes()), Some(secs), "{}", asctime);
        let rfc850 = format!("{day}, {d}-{mo}-{} {t} GMT", &y[2..]);
        let year: u64 = y.parse().expect("digits");
        let now = this_year();
        if year + 50 > now && year <= now + 50 {
            prop_assert_eq!(parse_http_date(rfc850.as_bytes()), Some(secs), "{}", rfc850);
        } else {
            prop_assert_ne!(parse_http_date(rfc850.as_bytes()), Some(secs), "{}", rfc850);
        }
    }

    /// A date assembled from any day, month, year and time is accepted only when it is one:
    /// what is accepted formats back to the same day, month, year and time (the day name is
    /// not checked, and second 60, a leap second, is the next second).
    #[test]
    fn accepted_dates_are_calendar_dates(
        day in 0u32..40,
        month in prop::sample::select(&["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "Foo"][..]),
        year in prop_oneof![1960u32..2200, 1960u32..10_000],
        h in 0u32..30, m in 0u32..70, s in 0u32..70,
        form in 0u8..3,
    ) {
        let time = format!("{h:02}:{m:02}:{s:02}");
        let v = match form {
            0 => format!("Sun, {day:02} {month} {year:04} {time} GMT"),
            1 => format!("Sun {month} {day:>2} {time} {year:04}"),
            _ => format!("Sunday, {day:02}-{month}-{:02} {time} GMT", year % 100),
        };
        if let Some(secs) = parse_http_date(v.as_bytes()) {
            prop_assert!(secs <= LAST_SECOND + 1);
            let (_, d, mo, y, t) = imf_parts(if s == 60 { secs - 1 } else { secs });
            prop_assert_eq!(d, format!("{day:02}"), "{}", v);
            prop_assert_eq!(mo, month, "{}", v);
            if form != 2 {
                prop_assert_eq!(y, format!("{year:04}"), "{}", v);
            } else {
                prop_assert_eq!(&y[2..], format!("{:02}", year % 100), "{}", v);
            }
            let want = if s == 60 { format!("{h:02}:{m:02}:59") } else { time };
            prop_assert_eq!(t, want, "{}", v);
        }
    }

    #[test]
    fn dates_arbitrary_bytes_never_panic(
        b in bytes_of(40),
        secs in 0u64..=LAST_SECOND,
        at in any::<usize>(), op in any::<u8>(), byte in any::<u8>(),
    ) {
        let _ = parse_http_date(&b);
        // A mutated real date: no panic, and whatever is accepted is a real second.
        let m = mutate(imf(secs).into_bytes(), at, op, byte);
        if let Some(t) = parse_http_date(&m) {
            prop_assert!(t <= LAST_SECOND + 1);
        }
    }
}

/// Found by `accepted_dates_are_calendar_dates`: `31 Feb` was read as 3 March (and `31 Apr`
/// as 1 May), where RFC 9111 §5.3 wants an invalid date (an `Expires` already past).
#[test]
fn days_a_month_does_not_have_are_not_dates() {
    for bad in [
        &b"Sun, 31 Feb 1994 08:49:37 GMT"[..],
        b"Sun, 29 Feb 1900 08:49:37 GMT",
        b"Sun, 31 Apr 2024 08:49:37 GMT",
        b"Sun Feb 30 08:49:37 2024",
        b"Sunday, 31-Jun-24 08:49:37 GMT",
    ] {
        assert_eq!(
            parse_http_date(bad),
            None,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        parse_http_date(b"Thu, 29 Feb 2024 00:00:00 GMT"),
        Some(1_709_164_800)
    );
    assert_eq!(
        parse_http_date(b"Tue, 29 Feb 2000 00:00:00 GMT"),
        Some(951_782_400)
    );
}

/// Found by `dates_round_trip_in_the_three_forms`: a two-digit year was read as 1970-2069
/// whatever the date, so `06-Nov-75` was 1975 though 2075 is less than 50 years ahead
/// (RFC 9110 §5.6.7 reads a year as the past only when it appears more than 50 years ahead).
#[test]
fn rfc850_two_digit_years_follow_the_current_year() {
    let now = this_year();
    for yy in 0..100u64 {
        let v = format!("Sunday, 06-Nov-{yy:02} 08:49:37 GMT");
        let secs = parse_http_date(v.as_bytes()).expect("a date");
        let year: u64 = imf_parts(secs).3.parse().expect("a year");
        assert_eq!(year % 100, yy);
        assert!(year + 50 > now && year <= now + 50, "{v}: {year}");
    }
}

// ---------------------------------------------------------------------------------------------
// Vary (RFC 9111 §4.1).

const CODINGS: [&str; 6] = ["gzip", "br", "deflate", "zstd", "identity", "*"];

fn coding() -> impl Strategy<Value = (String, Option<&'static str>)> {
    (
        prop::sample::select(&CODINGS[..]),
        any::<u64>(),
        prop::option::of(prop::sample::select(
            &["q=0", "q=0.0", "q=0.000", "Q=0", "q=0.5", "q=1", "q=1.000"][..],
        )),
    )
        .prop_map(|(c, mask, q)| (recase(c, mask), q))
}

proptest! {
    #![proptest_config(prop_support::config())]

    /// `Accept-Encoding` is compared as the set of codings accepted: order, case, OWS,
    /// duplicates and the split into lines do not matter, and a coding refused with q=0 is
    /// not in it; then the refused codings that change what is acceptable (RFC 9110 §12.5.3).
    #[test]
    fn accept_encoding_is_a_set(
        list in proptest::collection::vec(coding(), 0..6),
        shuffled in any::<u64>(),
        cut in any::<prop::sample::Index>(),
        ows in "[ \t]{0,2}",
    ) {
        let item = |(c, q): &(String, Option<&str>)| match q {
            Some(q) => format!("{c}{ows};{ows}{q}"),
            None => c.clone(),
        };
        let one = list.iter().map(item).collect::<Vec<_>>().join(", ");
        let whole = vary_value(b"accept-encoding", &mut std::iter::once(one.as_bytes()));
        // Another order (a rotation and a reversal), split in two lines.
        let mut other: Vec<String> = list.iter().map(item).collect();
        if !other.is_empty() {
            let n = other.len();
            other.rotate_left((shuffled % n as u64) as usize);
            if shuffled & 1 == 1 {
                other.reverse();
            }
        }
        let at = cut.index(other.len() + 1);
        let (a, b) = (other[..at].join(format!("{ows},{ows}").as_str()), other[at..].join(","));
        let split = vary_value(b"Accept-Encoding", &mut [a.as_bytes(), b.as_bytes()].into_iter());
        prop_assert_eq!(&split, &whole);
        prop_assert_ne!(&whole[..], VARY_ABSENT);
        let no = |q: &Option<&str>| matches!(q, Some(q) if q[2..].bytes().all(|b| b == b'0' || b == b'.'));
        let mut want: Vec<String> = list
            .iter()
            .filter(|(_, q)| !no(q))
            .map(|(c, _)| c.to_ascii_lowercase())
            .collect();
        want.sort();
        want.dedup();
        // RFC 9110 §12.5.3: a refused coding counts against an accepted `*`, as `identity` or
        // `*`, or against the same coding accepted; otherwise it is not acceptable anyway.
        let mut refused: Vec<String> = list
            .iter()
            .filter(|(_, q)| no(q))
            .map(|(c, _)| c.to_ascii_lowercase())
            .filter(|c| want.iter().any(|w| w == "*" || w == c) || c == "identity" || c == "*")
            .collect();
        refused.sort();
        refused.dedup();
        want.extend(refused.iter().map(|c| format!("{c};q=0")));
        prop_assert_eq!(String::from_utf8(whole).expect("ASCII"), want.join(","));
    }

    /// Any other field: its lines joined as one list; an absent field matches only an absent
    /// one; names are lower case, without duplicates, and `*` never matches.
    #[test]
    fn vary_values_and_names(
        name in "[A-Za-z-]{1,16}",
        lines in proptest::collection::vec(unquoted(20), 0..4),
        names in proptest::collection::vec("[A-Za-z-]{1,10}|\\*", 0..6),
        raw in bytes_of(60),
    ) {
        let got = vary_value(name.as_bytes(), &mut lines.iter().map(|l| &l[..]));
        if lines.is_empty() {
            prop_assert_eq!(&got[..], VARY_ABSENT);
        } else {
            prop_assert_ne!(&got[..], VARY_ABSENT);
            let joined = lines.join(&b", "[..]);
            let one = vary_value(name.as_bytes(), &mut std::iter::once(&joined[..]));
            prop_assert_eq!(&got, &one);
        }
        let line = names.join(", ");
        match vary_names(std::iter::once(line.as_bytes())) {
            None => prop_assert!(names.iter().any(|n| n == "*")),
            Some(v) => {
                prop_assert!(!names.iter().any(|n| n == "*"));
                let mut want: Vec<String> = Vec::new();
                for n in &names {
                    let n = n.to_ascii_lowercase();
                    if !want.contains(&n) {
                        want.push(n);
                    }
                }
                let got: Vec<String> = v.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
                prop_assert_eq!(got, want);
            }
        }
        // Arbitrary bytes: no panic.
        let _ = vary_value(&raw, &mut std::iter::once(&raw[..]));
        let _ = vary_value(b"accept-encoding", &mut std::iter::once(&raw[..]));
        let _ = vary_names(std::iter::once(&raw[..]));
        let _ = none_match_hits(&raw, Some(&raw[..raw.len() / 2]));
        let _ = (weak_match(&raw, b"\"a\""), strong_match(b"W/\"a\"", &raw));
    }
}

// Accept-Language (RFC 9111 §4.1, RFC 9110 §12.5.4), against a model worked out apart.

/// Language ranges: valid ones (RFC 4647 §2.1) and, after them, ones that are not.
const LANG_RANGES: [&str; 13] = [
    "en",
    "de",
    "de-ch",
    "fr",
    "*",
    "zh-hant-tw",
    "x-klingon",
    "en-gb",
    "en_us",
    "abcdefghi",
    "de-",
    "1en",
    "*-ch",
];
/// Weights, in classes of one meaning each (the first five valid, RFC 9110 §12.4.2).
const LANG_WEIGHTS: [&[&str]; 9] = [
    &["", ";q=1", ";Q=1.000", ";q=1."],
    &[";q=0.5", " ; q=0.50", ";q=0.500"],
    &[";q=0", ";q=0.000", ";Q=0.0"],
    &[";q=0.8"],
    &[";q=0.25", ";q=0.250"],
    &[";q=1.5"],
    &[";q=.5"],
    &[";level=1"],
    &[";q = 0.5", ";q=0.5;q=0.5", ";", ";q=0.1234"],
];

/// What an `Accept-Language` value's items mean: `None` when one is not
/// `language-range [ weight ]`; else each range in lower case with its weight in
/// thousandths, in the order listed.
fn language_meaning(items: &[String]) -> Option<Vec<(String, u32)>> {
    let ows: &[char] = &[' ', '\t'];
    items
        .iter()
        .map(|item| {
            let (range, weight) = match item.split_once(';') {
                Some((r, w)) => (r.trim_matches(ows), Some(w.trim_matches(ows))),
                None => (item.trim_matches(ows), None),
            };
            let ok_range = range == "*"
                || range.split('-').enumerate().all(|(i, sub)| {
                    (1..=8).contains(&sub.len())
                        && sub
                            .chars()
                            .all(|c| c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
                });
            if !ok_range {
                return None;
            }
            let q = match weight {
                None => 1000,
                Some(w) => {
                    let v = w.strip_prefix("q=").or_else(|| w.strip_prefix("Q="))?;
                    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
                    if frac.len() > 3 || !frac.chars().all(|c| c.is_ascii_digit()) {
                        return None;
                    }
                    let thousandths: u32 = format!("{frac:0<3}").parse().ok()?;
                    match int {
                        "0" => thousandths,
                        "1" if thousandths == 0 => 1000,
                        _ => return None,
                    }
                }
            };
            Some((range.to_ascii_lowercase(), q))
        })
        .collect()
}

/// The equivalence the normalised form keeps (RFC 9110 §12.5.4): two valid values whose
/// ranges are all distinct mean the same when they list, for each weight, the same ranges in
/// the same order; a value with a range listed twice only means what the same list means; a
/// value that is not an Accept-Language only what the same items mean.
fn languages_equivalent(a: &[String], b: &[String]) -> bool {
    let distinct = |m: &[(String, u32)]| {
        let mut seen = std::collections::HashSet::new();
        m.iter().all(|(r, _)| seen.insert(r.clone()))
    };
    let by_weight = |m: &[(String, u32)]| {
        let mut w: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
        for (r, q) in m {
            w.entry(*q).or_default().push(r.clone());
        }
        w
    };
    match (language_meaning(a), language_meaning(b)) {
        (Some(x), Some(y)) if distinct(&x) && distinct(&y) => by_weight(&x) == by_weight(&y),
        (Some(x), Some(y)) => x == y,
        (None, None) => a == b,
        _ => false,
    }
}

/// A value's items as `vary_value` splits them (no quotes in these values).
fn items_of(v: &str) -> Vec<String> {
    v.split(',')
        .map(|i| i.trim_matches(&[' ', '\t'][..]).to_string())
        .filter(|i| !i.is_empty())
        .collect()
}

fn accept_language(lines: &[&str]) -> String {
    let v = vary_value(b"accept-language", &mut lines.iter().map(|l| l.as_bytes()));
    String::from_utf8(v).expect("ASCII in, ASCII out")
}

/// One item: a range (mostly valid), the class of its weight (mostly valid), two spellings of
/// that weight, two case masks.
fn language_item() -> impl Strategy<Value = (usize, usize, usize, usize, u64, u64)> {
    (
        prop_oneof![6 => 0..8usize, 1 => 8..LANG_RANGES.len()],
        prop_oneof![8 => 0..5usize, 1 => 5..LANG_WEIGHTS.len()],
        any::<usize>(),
        any::<usize>(),
        any::<u64>(),
        any::<u64>(),
    )
}

proptest! {
    #![proptest_config(prop_support::config())]

    /// Two spellings of one list, the second reordered, recased, its weights spelled another
    /// way and split over two lines: their normalised forms are equal exactly when the model
    /// says they mean the same (RFC 9111 §4.1: normalised only "in a way that is known to have
    /// identical semantics").
    #[test]
    fn accept_language_forms_are_equal_exactly_when_the_meaning_is(
        list in proptest::collection::vec(language_item(), 0..6),
        order in proptest::collection::vec(any::<u32>(), 6),
        cut in any::<prop::sample::Index>(),
        sep in prop::sample::select(&[",", ", ", " ,\t", ",,"][..]),
    ) {
        let spell = |(r, w, sa, sb, ma, mb): &(usize, usize, usize, usize, u64, u64), second: bool| {
            let class = LANG_WEIGHTS[*w];
            let (s, m) = if second { (*sb, *mb) } else { (*sa, *ma) };
            format!("{}{}", recase(LANG_RANGES[*r], m), class[s % class.len()])
        };
        let a: Vec<String> = list.iter().map(|i| spell(i, false)).collect();
        let mut idx: Vec<usize> = (0..list.len()).collect();
        idx.sort_by_key(|i| order[*i]);
        let b: Vec<String> = idx.iter().map(|i| spell(&list[*i], true)).collect();
        let one = a.join(sep);
        let at = cut.index(b.len() + 1);
        let (b1, b2) = (b[..at].join(sep), b[at..].join(", "));
        let va = accept_language(&[&one]);
        let vb = accept_language(&[&b1, &b2]);
        let (ia, ib) = (items_of(&one), items_of(&format!("{b1},{b2}")));
        prop_assert_eq!(va == vb, languages_equivalent(&ia, &ib), "{:?} / {:?}: {:?} {:?}", one, (&b1, &b2), va, vb);
    }

    /// Any value: no panic; the form means what the value means, and is its own form.
    #[test]
    fn accept_language_forms_keep_the_meaning_and_are_stable(
        list in proptest::collection::vec(language_item(), 0..8),
        v in "[a-zA-Z0-9,;=.* \t_-]{0,90}",
        raw in proptest::collection::vec(any::<u8>().prop_filter("a field value's byte", |b| !matches!(b, 0 | b'\r' | b'\n')), 0..120),
    ) {
        let spelled = list
            .iter()
            .map(|(r, w, s, _, m, _)| {
                let class = LANG_WEIGHTS[*w];
                format!("{}{}", recase(LANG_RANGES[*r], *m), class[s % class.len()])
            })
            .collect::<Vec<_>>()
            .join(", ");
        for v in [&spelled, &v] {
            let out = accept_language(&[v]);
            prop_assert!(languages_equivalent(&items_of(v), &items_of(&out)), "{:?} -> {:?}", v, out);
            prop_assert_eq!(accept_language(&[&out]), out.clone());
        }
        let got = vary_value(b"Accept-Language", &mut std::iter::once(&raw[..]));
        let again = vary_value(b"Accept-Language", &mut std::iter::once(&got[..]));
        prop_assert_eq!(again, got);
    }
}

// ---------------------------------------------------------------------------------------------
// Ranges served from a stored response (RFC 9110 §14.1.2, §14.2).

/// The answer for one range, computed apart with u128 arithmetic.
fn range_model(first: &str, last: &str, len: u64) -> RangeAnswer {
    let num = |s: &str| -> Option<u128> {
        (!s.is_empty() && s.len() <= 19)
            .then(|| s.parse::<u128>().ok())
            .flatten()
    };
    let len = u128::from(len);
    let part = |a: u128, b: u128| RangeAnswer::Part(a as u64, b as u64);
    match (first.is_empty(), last.is_empty()) {
        (true, true) => RangeAnswer::Full,
        (true, false) => match num(last) {
            None => RangeAnswer::Full,
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => part(len - n.min(len), len - 1),
        },
        (false, _) => {
            let Some(a) = num(first) else {
                return RangeAnswer::Full;
            };
            let b = if last.is_empty() {
                Some(u128::MAX)
            } else {
                num(last)
            };
            let Some(b) = b else { return RangeAnswer::Full };
            if b < a {
                RangeAnswer::Full
            } else if a >= len {
                RangeAnswer::Unsatisfiable
            } else {
                part(a, b.min(len - 1))
            }
        }
    }
}

fn position() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (0u64..200).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[0-9]{1,25}",
    ]
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn byte_ranges_follow_the_model(
        first in position(),
        last in position(),
        len in prop_oneof![0u64..300, any::<u64>()],
    ) {
        let got = byte_range(format!("bytes={first}-{last}").as_bytes(), len);
        prop_assert_eq!(&got, &range_model(&first, &last, len));
        if let RangeAnswer::Part(a, b) = got {
            prop_assert!(a <= b && b < len);
        }
        // Several ranges may be answered whole (§14.2); another unit is not understood.
        let two = format!("bytes={first}-{last},0-1");
        prop_assert_eq!(byte_range(two.as_bytes(), len), RangeAnswer::Full);
        let other = format!("items={first}-{last}");
        prop_assert_eq!(byte_range(other.as_bytes(), len), RangeAnswer::Full);
    }

    #[test]
    fn byte_ranges_arbitrary_bytes_stay_inside(b in bytes_of(40), len in prop_oneof![0u64..300, any::<u64>()]) {
        let mut v = b"bytes=".to_vec();
        v.extend_from_slice(&b);
        for r in [&b[..], &v[..]] {
            if let RangeAnswer::Part(a, e) = byte_range(r, len) {
                prop_assert!(a <= e && e < len);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Field names as the analysis of a response classifies them (`policy::field_name`).

/// Every name `field_name` tells apart, lower case, and what it is.
const NAMED: [(&str, FieldName); 23] = [
    ("cache-control", FieldName::CacheControl),
    ("age", FieldName::Age),
    ("date", FieldName::Date),
    ("expires", FieldName::Expires),
    ("last-modified", FieldName::LastModified),
    ("etag", FieldName::ETag),
    ("vary", FieldName::Vary),
    ("set-cookie", FieldName::SetCookie),
    ("set-cookie2", FieldName::SetCookie),
    ("cache-status", FieldName::CacheStatus),
    ("surrogate-key", FieldName::SurrogateKey),
    ("te", FieldName::Unstorable),
    ("trailer", FieldName::Unstorable),
    ("upgrade", FieldName::Unstorable),
    ("connection", FieldName::Unstorable),
    ("keep-alive", FieldName::Unstorable),
    ("x-request-id", FieldName::Unstorable),
    ("content-length", FieldName::Unstorable),
    ("proxy-connection", FieldName::Unstorable),
    ("transfer-encoding", FieldName::Unstorable),
    ("proxy-authenticate", FieldName::Unstorable),
    ("proxy-authorization", FieldName::Unstorable),
    ("proxy-authentication-info", FieldName::Unstorable),
];

/// A name of [`NAMED`] in any case, one with a byte changed, added or removed (a near miss:
/// same length or first letter), or any bytes.
fn field_name_bytes() -> impl Strategy<Value = Vec<u8>> {
    let named = prop::sample::select(NAMED.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    prop_oneof![
        (named.clone(), any::<u64>()).prop_map(|(n, mask)| recase(n, mask).into_bytes()),
        (named, any::<usize>(), any::<u8>(), any::<u8>()).prop_map(|(n, at, op, b)| mutate(
            n.as_bytes().to_vec(),
            at,
            op % 4,
            b
        )),
        bytes_of(30),
    ]
}

proptest! {
    // Cheap cases: many of them by default.
    #![proptest_config(ProptestConfig {
        cases: prop_support::config().cases.max(2048),
        ..prop_support::config()
    })]

    /// `field_name` is the table of [`NAMED`] read without regard to ASCII case (RFC 9110
    /// §5.1), and what it calls unstorable (Age included) is what `unstorable_field` calls so
    /// (RFC 9111 §3.1).
    #[test]
    fn field_names_are_classified_by_the_table(n in field_name_bytes()) {
        let want = NAMED
            .iter()
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(&n))
            .map_or(FieldName::Other, |(_, c)| *c);
        prop_assert_eq!(field_name(&n), want, "{:?}", String::from_utf8_lossy(&n));
        prop_assert_eq!(
            matches!(want, FieldName::Unstorable | FieldName::Age),
            unstorable_field(&n)
        );
    }
}

#[test]
fn field_names_in_the_table_are_classified_in_any_case() {
    for (n, c) in NAMED {
        assert_eq!(field_name(n.as_bytes()), c, "{n}");
        assert_eq!(field_name(n.to_ascii_uppercase().as_bytes()), c, "{n}");
    }
    for n in [
        "",
        "x",
        "dat",
        "dates",
        "cache-contro",
        "cache_control",
        "cdn-cache-control",
    ] {
        assert_eq!(field_name(n.as_bytes()), FieldName::Other, "{n}");
    }
}
