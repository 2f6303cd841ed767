//! What the cache fuzz tests share (`tests/fuzz_cache_conn.rs`, `tests/fuzz_cache_redis.rs`):
//! the origin's and the client's grammars, the origin test server's answers, the strict
//! response parser, and the checks of every answer against what the origin sent (see
//! `tests/fuzz_cache_conn.rs` for what they assert). Included with
//! `#[path = "prop_support/cache_fuzz.rs"] mod cache_fuzz;` beside `mod support;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use ringway::config::DriverChoice;

use crate::support::*;

/// URLs per case.
pub const URLS: usize = 3;
/// Representations per URL a request without `Authorization` gets (those with get as many
/// more, `AUTH_REP` up).
pub const REPS: u8 = 4;
pub const AUTH_REP: u8 = 4;
/// A case's `Last-Modified` dates: this far before now, less an hour per representation.
pub const LM_BASE_AGO: u64 = 100 * 86_400;

// ---------------------------------------------------------------------------------------------
// The origin's grammar.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Frame {
    Length,
    Chunked,
    Close,
}

#[derive(Debug, Clone)]
pub struct OriginSpec {
    pub status: u16,
    pub rep: u8,
    pub cache_control: Vec<Vec<&'static str>>,
    pub expires: Option<u8>,
    pub date: Option<u8>,
    pub last_modified: Option<u8>,
    pub etag: Option<u8>,
    pub vary: Option<&'static str>,
    pub accept_ranges: bool,
    pub content_range_on_200: bool,
    pub set_cookie: bool,
    pub age: Option<&'static str>,
    pub frame: Frame,
    /// A `103 Early Hints` first.
    pub early_hints: bool,
    /// A trailer section after a chunked body.
    pub trailer: bool,
}

pub fn directive() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        8 => Just("max-age=3600"),
        2 => Just("s-maxage=3600"),
        3 => Just("public"),
        8 => prop::sample::select(vec![
            "max-age=0",
            "max-age=60",
            "s-maxage=0",
            "no-store",
            "no-cache",
            "no-cache=\"set-cookie\"",
            "private",
            "private=\"x-secret\"",
            "must-revalidate",
            "proxy-revalidate",
            "stale-while-revalidate=60",
            "stale-if-error=60",
            "immutable",
            "max-age=abc",
            "max-age =5",
            "junk",
            "x=\"a,b\"",
            "",
            "must-understand",
        ]),
    ]
}

pub fn origin_spec() -> impl Strategy<Value = OriginSpec> {
    let status = prop::sample::select(vec![
        200u16, 200, 200, 200, 200, 203, 204, 206, 206, 206, 299, 301, 302, 304, 304, 304, 307,
        404, 410, 500, 501, 599,
    ]);
    let cc = prop::collection::vec(prop::collection::vec(directive(), 0..4), 0..3);
    let vary = prop::option::weighted(
        0.3,
        prop::sample::select(vec![
            "Accept-Encoding",
            "Accept-Language",
            "accept-encoding, accept-language",
            "*",
            "Accept-Encoding, *",
            "j@nk",
            "X-Nothing",
        ]),
    );
    let age = prop::option::weighted(
        0.15,
        prop::sample::select(vec!["10", "junk", "99999", "5, 6"]),
    );
    let frame = prop::sample::select(vec![
        Frame::Length,
        Frame::Length,
        Frame::Chunked,
        Frame::Close,
    ]);
    (
        (status, 0u8..REPS, cc, prop::option::weighted(0.3, 0u8..4)),
        (
            prop::option::weighted(0.5, 0u8..3),
            prop::option::weighted(0.5, 0u8..3),
            prop::option::weighted(0.6, 0u8..4),
        ),
        (
            vary,
            any::<bool>(),
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.15),
        ),
        (
            age,
            frame,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.3),
        ),
    )
        .prop_map(
            |(
                (status, rep, cache_control, expires),
                (date, last_modified, etag),
                (vary, accept_ranges, content_range_on_200, set_cookie),
                (age, frame, early_hints, trailer),
            )| OriginSpec {
                status,
                rep,
                cache_control,
                expires,
                date,
                last_modified,
                etag,
                vary,
                accept_ranges,
                content_range_on_200,
                set_cookie,
                age,
                frame,
                early_hints,
                trailer,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// The client's grammar.

#[derive(Debug, Clone)]
pub struct ClientReq {
    pub method: &'static str,
    pub url: usize,
    pub auth: bool,
    pub if_none_match: Option<&'static str>,
    pub if_modified_since: Option<u8>,
    pub if_match: Option<&'static str>,
    pub if_range: Option<&'static str>,
    pub range: Option<&'static str>,
    pub accept_encoding: Option<&'static str>,
    pub accept_language: Option<&'static str>,
    pub cache_control: Option<&'static str>,
    pub pragma: bool,
    pub close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`.
    pub http10: bool,
    /// A body on any method (POST and PUT always have one): none, by Content-Length, chunked.
    /// It holds a request head for `/c/<case>/smuggled`, which nobody may take for one.
    pub body: u8,
    /// `If-None-Match`, `Accept-Encoding` and `Accept-Language` lists sent one item a line
    /// (one list all the same, RFC 9110 §5.3).
    pub split_lists: bool,
    /// Sent in the same write as the request before it.
    pub pipelined: bool,
}

pub fn client_req() -> impl Strategy<Value = ClientReq> {
    let method = prop::sample::select(vec![
        "GET", "GET", "GET", "GET", "GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "DELETE",
    ]);
    let inm = prop::option::weighted(
        0.2,
        prop::sample::select(vec![
            "\"r0\"",
            "\"r1\"",
            "W/\"r0\"",
            "\"r4\"",
            "*",
            "\"r2\", \"r3\"",
            "junk",
        ]),
    );
    let im = prop::option::weighted(0.1, prop::sample::select(vec!["\"r0\"", "\"r1\"", "*"]));
    let ir = prop::option::weighted(
        0.15,
        prop::sample::select(vec!["\"r0\"", "\"r1\"", "W/\"r0\"", "LM", "junk"]),
    );
    let range = prop::option::weighted(
        0.35,
        prop::sample::select(vec![
            "bytes=0-5",
            "bytes=3-",
            "bytes=-4",
            "bytes=2-9",
            "bytes=0-0",
            "bytes=10-2000",
            "bytes=0-1,4-6",
            "bytes=z",
            "items=0-1",
            "bytes=5000-",
        ]),
    );
    let ae = prop::option::weighted(
        0.3,
        prop::sample::select(vec!["gzip", "br, gzip", "identity", "gzip;q=0", ""]),
    );
    let al = prop::option::weighted(0.2, prop::sample::select(vec!["en", "fr", "en, fr;q=0.5"]));
    let cc = prop::option::weighted(
        0.2,
        prop::sample::select(vec![
            "no-cache",
            "max-age=0",
            "only-if-cached",
            "max-stale",
            "max-stale=5",
            "no-store",
            "min-fresh=10",
            "jun k",
        ]),
    );
    (
        (method, 0..URLS, prop::bool::weighted(0.12)),
        (inm, prop::option::weighted(0.15, 0u8..4), im, ir, range),
        (ae, al, cc, prop::bool::weighted(0.05)),
        (
            prop::bool::weighted(0.02),
            prop::bool::weighted(0.25),
            prop::bool::weighted(0.08),
            prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
            prop::bool::weighted(0.3),
        ),
    )
        .prop_map(
            |(
                (method, url, auth),
                (if_none_match, if_modified_since, if_match, if_range, range),
                (accept_encoding, accept_language, cache_control, pragma),
                (close, pipelined, http10, body, split_lists),
            )| ClientReq {
                method,
                url,
                auth,
                if_none_match,
                if_modified_since,
                if_match,
                if_range,
                range,
                accept_encoding,
                accept_language,
                cache_control,
                pragma,
                close,
                http10,
                body,
                split_lists,
                pipelined,
            },
        )
}

#[derive(Debug, Clone)]
pub struct Case {
    pub origin: Vec<OriginSpec>,
    pub client: Vec<ClientReq>,
}

pub fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(origin_spec(), 1..6),
        prop::collection::vec(client_req(), 1..14),
    )
        .prop_map(|(origin, client)| Case { origin, client })
}

// ---------------------------------------------------------------------------------------------
// The origin.

/// The bytes of representation `rep` of `path`: they name both, and their length depends on
/// `rep`.
pub fn representation(path: &str, rep: u8) -> Vec<u8> {
    let unit = format!("[{path} r{rep}]");
    // The largest is read in several pieces, and is over the second gateway's
    // `max_object_bytes`.
    let len = [14, 60, 300, 70_000][rep as usize % 4];
    unit.bytes().cycle().take(len.max(unit.len())).collect()
}

pub fn etag_of(rep: u8, how: u8) -> String {
    match how {
        0 | 1 => format!("\"r{rep}\""),
        2 => format!("W/\"r{rep}\""),
        _ => format!("r{rep}-unquoted"),
    }
}

pub fn lm_secs(start: u64, rep: u8) -> u64 {
    start - LM_BASE_AGO - 3600 * rep as u64
}

pub fn http_date(secs: u64) -> String {
    String::from_utf8_lossy(&ringway::date::http_date(secs)).to_string()
}

/// One response the origin sent (its `x-serial` is its index).
#[derive(Debug, Clone)]
pub struct Sent {
    pub path: String,
    pub rep: u8,
    pub status: u16,
    pub spec: OriginSpec,
    /// The response may be stored for a request with `Authorization` (RFC 9111 §3.5).
    pub shared: bool,
    /// `Set-Cookie` value, if any.
    pub cookie: Option<String>,
    /// `X-Req` of the request it answered.
    pub req_id: Option<String>,
    /// `Accept-Encoding` and `Accept-Language` of the request it answered, normalised.
    pub ae: Option<String>,
    pub al: Option<String>,
    /// The request it answered had `Authorization`, or `Cache-Control: no-store`.
    pub req_auth: bool,
    pub req_no_store: bool,
    /// It answered an unsafe method with a 2xx or 3xx (RFC 9111 §4.4 invalidates the URL).
    pub invalidates: bool,
    /// Stale when sent, by at least this many seconds, whatever reading of its fields a
    /// cache takes (None: it may be fresh).
    pub stale_by: Option<u64>,
    /// When the origin made it (milliseconds since the epoch).
    pub at_ms: u64,
}

/// The items of a list value, trimmed, those refused with `q=0` left out, sorted: the
/// accepted set, so that `gzip;q=0` and the empty value compare equal, as `br, gzip` and
/// `gzip,br` do (RFC 9110 §12.5.3; a cache may tell them apart, never merge others).
pub fn accepted(v: Option<&str>) -> Option<String> {
    v.map(|v| {
        let mut items: Vec<&str> = v
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty() && !i.replace(' ', "").ends_with(";q=0"))
            .collect();
        items.sort_unstable();
        items.join(",")
    })
}

/// The lines of a list field as one value, items trimmed and joined by ", " (RFC 9110 §5.3).
pub fn joined(req: &Req, name: &str) -> Option<String> {
    let lines = req.headers_named(name);
    (!lines.is_empty()).then(|| {
        lines
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The directives of the spec's `Cache-Control` lines: name (lowercase, as written before
/// `=`) and argument.
pub fn directives(spec: &OriginSpec) -> Vec<(String, Option<String>)> {
    spec.cache_control
        .iter()
        .flatten()
        .filter(|d| !d.is_empty())
        .map(|d| match d.split_once('=') {
            Some((n, a)) => (n.to_ascii_lowercase(), Some(a.to_string())),
            None => (d.to_ascii_lowercase(), None),
        })
        .collect()
}

pub fn has_directive(spec: &OriginSpec, name: &str) -> bool {
    directives(spec)
        .iter()
        .any(|(n, a)| n == name && a.is_none())
}

/// The response may never be served stale: `must-revalidate`, `proxy-revalidate` or a valid
/// `s-maxage` (RFC 9111 §4.2.4; not even under `max-stale`, `stale-while-revalidate` or
/// `stale-if-error`).
pub fn forbids_stale(spec: &OriginSpec) -> bool {
    directives(spec).iter().any(|(n, a)| match n.as_str() {
        "must-revalidate" | "proxy-revalidate" => a.is_none(),
        "s-maxage" => a.as_deref().is_some_and(|a| a.parse::<u64>().is_ok()),
        _ => false,
    })
}

/// See [`Sent::stale_by`]: the most freshness any reading gives (RFC 9111 §4.2.1: the
/// largest of repeated values, invalid ones ignored), against the least age any reading
/// gives (§4.2.3).
pub fn stale_by(spec: &OriginSpec, status: u16) -> Option<u64> {
    if status == 304 {
        // Its fields are merged with a stored response's: unknown here.
        return None;
    }
    let ds = directives(spec);
    let valid = |name: &str| -> Vec<u64> {
        ds.iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, a)| a.as_deref()?.parse().ok())
            .collect()
    };
    let invalid = |name: &str| {
        ds.iter()
            .any(|(n, a)| n == name && a.as_deref().is_none_or(|a| a.parse::<u64>().is_err()))
    };
    let (smax, max) = (valid("s-maxage"), valid("max-age"));
    let lifetime = if let Some(m) = smax.iter().max() {
        *m
    } else if invalid("s-maxage") {
        return None;
    } else if let Some(m) = max.iter().max() {
        *m
    } else if invalid("max-age") {
        return None;
    } else {
        match spec.expires? {
            // An hour after now, and after a `Date` two hours ago.
            0 => 3600 + if spec.date == Some(1) { 7200 } else { 0 } + 2,
            // In the past, or invalid (RFC 9111 §5.3).
            _ => 0,
        }
    };
    let apparent: u64 = if spec.date == Some(1) { 7200 - 2 } else { 0 };
    let age: u64 = match spec.age {
        Some("10") => 10,
        Some("99999") => 99_999,
        _ => 0,
    };
    let current = apparent.max(age);
    if lifetime == 0 {
        Some(current)
    } else if current >= lifetime + 2 {
        Some(current - lifetime)
    } else {
        None
    }
}

/// The surrogate keys (`Surrogate-Key`) the origin tags a response for `path`
/// (`/c/<case>/u<i>`) with: one of the URL's own, and one of the case's first two URLs.
pub fn surrogate_keys(path: &str) -> Vec<String> {
    let mut p = path.trim_start_matches("/c/").split('/');
    let (case, url) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
    let mut keys = vec![format!("k{case}-{url}")];
    if matches!(url, "u0" | "u1") {
        keys.push(format!("k{case}-g"));
    }
    keys
}

/// An IMF-fixdate (RFC 9110 §5.6.7) as seconds since the epoch.
pub fn parse_fixdate(v: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let p: Vec<&str> = v.trim().split(' ').collect();
    if p.len() != 6 || p[5] != "GMT" {
        return None;
    }
    let d: i64 = p[1].parse().ok()?;
    let m = MONTHS.iter().position(|x| *x == p[2])? as i64 + 1;
    let y: i64 = p[3].parse().ok()?;
    let t: Vec<i64> = p[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if t.len() != 3 {
        return None;
    }
    // Days from civil (proleptic Gregorian).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]).ok()
}

/// `a` and `b` are entity tags that match by the weak comparison (RFC 9110 §8.8.3.2).
pub fn weak_eq(a: &str, b: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    strip(a).starts_with('"') && strip(a) == strip(b)
}

/// What the origin of the running case knows: the case's response specs, how many requests
/// it answered, what it sent.
#[derive(Default)]
pub struct OriginState {
    pub case_no: usize,
    pub specs: Vec<OriginSpec>,
    pub next: usize,
    pub sent: Vec<Sent>,
    pub start: u64,
}

pub fn single_range(v: &str, len: usize) -> Option<(usize, usize)> {
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    if a.is_empty() {
        let n: usize = b.parse().ok()?;
        if n == 0 || len == 0 {
            return None;
        }
        return Some((len.saturating_sub(n), len - 1));
    }
    let a: usize = a.parse().ok()?;
    let b: usize = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (a <= b && a < len).then_some((a, b))
}

pub fn origin_answer(st: &Mutex<OriginState>, req: &Req) -> Reply {
    if req.target.starts_with("/c/alive") {
        return Reply::Raw(ok_response(b"alive"));
    }
    let mut st = st.lock().unwrap();
    let prefix = format!("/c/{}/", st.case_no);
    if !req.target.starts_with(&prefix) || st.specs.is_empty() {
        // A late request of an earlier case (a background revalidation): a plain 404.
        return Reply::Raw(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\ncache-control: no-store\r\n\r\n"
                .to_vec(),
        );
    }
    let spec = st.specs[st.next % st.specs.len()].clone();
    st.next += 1;
    let serial = st.sent.len();
    let start = st.start;
    let auth = req.header("authorization").is_some();
    let rep = spec.rep + if auth { AUTH_REP } else { 0 };
    let path = req.target.clone();
    let body = representation(&path, rep);
    let head_req = req.method == "HEAD";
    // The validators of this representation, as this response sends them.
    let etag = spec.etag.map(|how| etag_of(rep, how));
    let valid_etag = etag.clone().filter(|t| t.contains('"'));
    let strong_etag = valid_etag.clone().filter(|t| !t.starts_with("W/"));
    let lm = matches!(spec.last_modified, Some(0 | 1)).then(|| lm_secs(start, rep));
    // The origin answers conditionals right: 304 only when they select nothing new (RFC
    // 9110 §13.1.2, §13.1.3, §13.2.2).
    let inm: Vec<&str> = req
        .headers_named("if-none-match")
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let get_or_head = matches!(req.method.as_str(), "GET" | "HEAD");
    let not_modified = get_or_head
        && if !inm.is_empty() {
            inm.iter()
                .any(|t| *t == "*" || valid_etag.as_deref().is_some_and(|e| weak_eq(t, e)))
        } else if let Some(ims) = req.header("if-modified-since") {
            parse_fixdate(ims).zip(lm).is_some_and(|(i, l)| l <= i)
        } else {
            false
        };
    let if_match_fails = req.header("if-match").is_some_and(|v| {
        !v.split(',')
            .map(str::trim)
            .any(|t| t == "*" || strong_etag.as_deref() == Some(t))
    });
    let if_range_ok = req.header("if-range").is_none_or(|v| {
        strong_etag.as_deref() == Some(v.trim())
            || lm.is_some_and(|l| parse_fixdate(v) == Some(l) && v.trim() == http_date(l))
    });
    let range = req
        .header("range")
        .filter(|_| req.method == "GET" && req.headers_named("range").len() == 1)
        .filter(|_| if_range_ok)
        .and_then(|v| single_range(v, body.len()));
    let status = match spec.status {
        _ if if_match_fails => 412,
        206 if range.is_none() => 200,
        304 if !not_modified => 200,
        s => s,
    };
    let mut h = format!("HTTP/1.1 {status} Status\r\nx-serial: {serial}\r\n");
    let mut shared = false;
    for line in &spec.cache_control {
        for d in line {
            let name = d
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            shared |= matches!(name.as_str(), "public" | "s-maxage" | "must-revalidate");
        }
        h += &format!("cache-control: {}\r\n", line.join(", "));
    }
    let now = ringway::date::unix_millis() / 1000;
    match spec.expires {
        Some(0) => h += &format!("expires: {}\r\n", http_date(now + 3600)),
        Some(1) => h += &format!("expires: {}\r\n", http_date(now - 3600)),
        Some(2) => h += "expires: 0\r\n",
        Some(_) => h += "expires: Thu, 18 Aug 2050 2:01:18 GMT\r\n",
        None => {}
    }
    match spec.date {
        Some(0) => h += &format!("date: {}\r\n", http_date(now)),
        Some(1) => h += &format!("date: {}\r\n", http_date(now - 7200)),
        Some(_) => h += "date: yesterday\r\n",
        None => {}
    }
    match spec.last_modified {
        Some(0) | Some(1) => h += &format!("last-modified: {}\r\n", http_date(lm_secs(start, rep))),
        Some(_) => h += "last-modified: garbage\r\n",
        None => {}
    }
    if let Some(t) = &etag {
        h += &format!("etag: {t}\r\n");
    }
    if let Some(v) = spec.vary {
        h += &format!("vary: {v}\r\n");
    }
    if spec.accept_ranges {
        h += "accept-ranges: bytes\r\n";
    }
    h += &format!("surrogate-key: {}\r\n", surrogate_keys(&path).join(" "));
    let cookie = spec.set_cookie.then(|| format!("s{serial}"));
    if let Some(c) = &cookie {
        h += &format!("set-cookie: id={c}; Path=/\r\n");
    }
    // Fields only this hop may see (RFC 9110 §7.6.1), and one `private="x-secret"` keeps out
    // of the store (RFC 9111 §5.2.2.7); sent every time.
    h += "connection: x-hop\r\nx-hop: 1\r\nx-secret: s\r\n";
    if let Some(a) = spec.age {
        h += &format!("age: {a}\r\n");
    }
    let payload: Vec<u8> = match status {
        204 | 304 | 412 => Vec::new(),
        206 => {
            let (a, b) = range.expect("a range for a 206");
            h += &format!("content-range: bytes {a}-{b}/{}\r\n", body.len());
            body[a..=b].to_vec()
        }
        _ => {
            if spec.content_range_on_200 {
                h += &format!("content-range: bytes 0-0/{}\r\n", body.len());
            }
            body
        }
    };
    let no_body = matches!(status, 204 | 304);
    let frame = spec.frame;
    match frame {
        _ if no_body => {}
        Frame::Length => h += &format!("content-length: {}\r\n", payload.len()),
        // Also on a HEAD, which says what a GET would get.
        Frame::Chunked => h += "transfer-encoding: chunked\r\n",
        Frame::Close => {}
    }
    if frame == Frame::Close {
        h += "connection: close\r\n";
    }
    h += "\r\n";
    let mut out = if spec.early_hints {
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n".to_vec()
    } else {
        Vec::new()
    };
    out.extend_from_slice(h.as_bytes());
    if !head_req && !no_body {
        if frame == Frame::Chunked {
            for piece in payload.chunks(if payload.len() > 1000 { 5000 } else { 17 }) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(if spec.trailer {
                &b"0\r\nx-trailer: t\r\n\r\n"[..]
            } else {
                b"0\r\n\r\n"
            });
        } else {
            out.extend_from_slice(&payload);
        }
    }
    let unsafe_method = !matches!(req.method.as_str(), "GET" | "HEAD" | "OPTIONS" | "TRACE");
    st.sent.push(Sent {
        path,
        rep,
        status,
        stale_by: stale_by(&spec, status),
        at_ms: ringway::date::unix_millis(),
        spec,
        shared,
        cookie,
        req_id: req.header("x-req").map(str::to_string),
        ae: accepted(joined(req, "accept-encoding").as_deref()),
        al: joined(req, "accept-language"),
        invalidates: unsafe_method && (200..400).contains(&status),
        req_auth: auth,
        req_no_store: req.headers_named("cache-control").iter().any(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-store"))
        }),
    });
    if frame == Frame::Close {
        Reply::RawClose(out)
    } else {
        Reply::Raw(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The client side: the strict parser.

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Framed by the end of the connection.
    pub close_delimited: bool,
}

impl Answer {
    pub fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    }
    pub fn all(&self, n: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn closes(&self) -> bool {
        self.close_delimited
            || self
                .all("connection")
                .iter()
                .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

pub struct Reader {
    pub s: TcpStream,
    pub buf: Vec<u8>,
    pub eof: bool,
}

impl Reader {
    pub fn fill(&mut self) -> Result<bool, String> {
        if self.eof {
            return Ok(false);
        }
        let mut tmp = [0u8; 16384];
        match self.s.read(&mut tmp) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                self.eof = true;
                Ok(false)
            }
            Err(e) => Err(format!("read from the gateway: {e} (stuck?)")),
        }
    }

    pub fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = self.buf[..p].to_vec();
                self.buf.drain(..p + 2);
                if l.contains(&b'\n') || l.contains(&b'\r') {
                    return Err(format!(
                        "bare CR or LF in {:?}",
                        String::from_utf8_lossy(&l)
                    ));
                }
                return Ok(l);
            }
            if !self.fill()? {
                return Err(format!(
                    "connection ended inside a line: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
        }
    }

    pub fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(format!(
                    "connection ended {} bytes short",
                    n - self.buf.len()
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one final response (1xx are refused: none is expected here). `Ok(None)`: the
    /// connection ended before any byte of one.
    pub fn answer(&mut self, head_req: bool) -> Result<Option<Answer>, String> {
        loop {
            match self.answer_or_1xx(head_req)? {
                Some(a) if a.status < 200 => continue,
                a => return Ok(a),
            }
        }
    }

    pub fn answer_or_1xx(&mut self, head_req: bool) -> Result<Option<Answer>, String> {
        if self.buf.is_empty() && !self.fill()? {
            return Ok(None);
        }
        let status_line = self.line()?;
        let sl = String::from_utf8(status_line).map_err(|_| "status line not UTF-8")?;
        let rest = sl
            .strip_prefix("HTTP/1.1 ")
            .ok_or_else(|| format!("bad status line {sl:?}"))?;
        let code = rest
            .get(..3)
            .ok_or_else(|| format!("bad status line {sl:?}"))?;
        if !code.bytes().all(|b| b.is_ascii_digit()) || rest.as_bytes().get(3) != Some(&b' ') {
            return Err(format!("bad status line {sl:?}"));
        }
        let status: u16 = code.parse().unwrap();
        if !(100..600).contains(&status) || status == 101 {
            return Err(format!("unexpected status {sl:?}"));
        }
        let mut headers = Vec::new();
        loop {
            let l = self.line()?;
            if l.is_empty() {
                break;
            }
            let l = String::from_utf8(l).map_err(|e| format!("field line not UTF-8: {e}"))?;
            let (name, value) = l
                .split_once(':')
                .ok_or_else(|| format!("field line without colon {l:?}"))?;
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token) {
                return Err(format!("bad field name {l:?}"));
            }
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut a = Answer {
            status,
            headers,
            body: Vec::new(),
            close_delimited: false,
        };
        let cls = a.all("content-length");
        let tes = a.all("transfer-encoding");
        if cls.len() > 1 {
            return Err(format!("several Content-Length: {a:?}"));
        }
        if !cls.is_empty() && !tes.is_empty() {
            return Err(format!("Content-Length and Transfer-Encoding: {a:?}"));
        }
        if status == 204 && (!cls.is_empty() || !tes.is_empty()) {
            return Err(format!(
                "a 204 with framing fields (RFC 9110 §8.6, §6.1): {a:?}"
            ));
        }
        let cl = match cls.first() {
            Some(v) => Some(
                v.parse::<usize>()
                    .ok()
                    .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("bad Content-Length {v:?}"))?,
            ),
            None => None,
        };
        if status < 200 {
            if !cls.is_empty() || !tes.is_empty() {
                return Err(format!("a 1xx with framing fields: {a:?}"));
            }
            return Ok(Some(a));
        }
        if head_req || status == 204 || status == 304 {
            return Ok(Some(a));
        }
        if let Some(te) = tes.first() {
            if tes.len() != 1 || !te.eq_ignore_ascii_case("chunked") {
                return Err(format!("transfer coding other than chunked: {a:?}"));
            }
            let mut body = Vec::new();
            loop {
                let l = self.line()?;
                let l = String::from_utf8(l).map_err(|_| "chunk line not UTF-8")?;
                let size = l.split(';').next().unwrap_or("");
                if size.is_empty() || !size.bytes().all(|b| b.is_ascii_hexdigit()) || size.len() > 8
                {
                    return Err(format!("bad chunk line {l:?}"));
                }
                let n = usize::from_str_radix(size, 16).unwrap();
                if n == 0 {
                    while !self.line()?.is_empty() {}
                    break;
                }
                body.extend(self.exact(n)?);
                if self.exact(2)? != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
            }
            a.body = body;
        } else if let Some(n) = cl {
            a.body = self.exact(n)?;
        } else {
            while self.fill()? {}
            a.body = std::mem::take(&mut self.buf);
            a.close_delimited = true;
        }
        Ok(Some(a))
    }
}

// ---------------------------------------------------------------------------------------------
// One case.

pub fn request_bytes(r: &ClientReq, path: &str, id: &str, start: u64) -> Vec<u8> {
    let mut h = format!(
        "{} {path} HTTP/1.{}\r\nHost: fuzz.test\r\nx-req: {id}\r\n",
        r.method,
        if r.http10 { 0 } else { 1 }
    );
    if r.auth {
        h += "Authorization: Bearer secret\r\n";
    }
    let list = |h: &mut String, name: &str, v: &str| {
        if r.split_lists && v.contains(',') {
            for item in v.split(',') {
                *h += &format!("{name}: {}\r\n", item.trim());
            }
        } else {
            *h += &format!("{name}: {v}\r\n");
        }
    };
    if let Some(v) = r.if_none_match {
        list(&mut h, "If-None-Match", v);
    }
    match r.if_modified_since {
        Some(0) => h += &format!("If-Modified-Since: {}\r\n", http_date(lm_secs(start, 0))),
        Some(1) => h += &format!("If-Modified-Since: {}\r\n", http_date(start + 86_400)),
        Some(2) => h += "If-Modified-Since: not a date\r\n",
        Some(_) => {
            h += &format!(
                "If-Modified-Since: {}\r\n",
                http_date(lm_secs(start, 3) - 10)
            )
        }
        None => {}
    }
    if let Some(v) = r.if_match {
        h += &format!("If-Match: {v}\r\n");
    }
    match r.if_range {
        Some("LM") => h += &format!("If-Range: {}\r\n", http_date(lm_secs(start, 0))),
        Some(v) => h += &format!("If-Range: {v}\r\n"),
        None => {}
    }
    if let Some(v) = r.range {
        h += &format!("Range: {v}\r\n");
    }
    if let Some(v) = r.accept_encoding {
        list(&mut h, "Accept-Encoding", v);
    }
    if let Some(v) = r.accept_language {
        list(&mut h, "Accept-Language", v);
    }
    if let Some(v) = r.cache_control {
        h += &format!("Cache-Control: {v}\r\n");
    }
    if r.pragma {
        h += "Pragma: no-cache\r\n";
    }
    if r.close {
        h += "Connection: close\r\n";
    } else if r.http10 {
        h += "Connection: keep-alive\r\n";
    }
    let inner = format!(
        "GET {} HTTP/1.1\r\nHost: fuzz.test\r\n\r\n",
        smuggled_path(path)
    );
    let how = match r.body {
        0 if matches!(r.method, "POST" | "PUT") => 1,
        // HTTP/1.0 has no chunked (RFC 9112 §6.1).
        2 if r.http10 => 1,
        b => b,
    };
    let mut v;
    match how {
        1 => {
            h += &format!("Content-Length: {}\r\n\r\n", inner.len());
            v = h.into_bytes();
            v.extend_from_slice(inner.as_bytes());
        }
        2 => {
            h += "Transfer-Encoding: chunked\r\n\r\n";
            v = h.into_bytes();
            v.extend_from_slice(format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len()).as_bytes());
        }
        _ => {
            h += "\r\n";
            v = h.into_bytes();
        }
    }
    v
}

/// The target of the request head inside request bodies.
pub fn smuggled_path(path: &str) -> String {
    format!("{}smuggled", &path[..path.rfind('/').unwrap_or(0) + 1])
}

pub fn check_answer(
    r: &ClientReq,
    path: &str,
    id: &str,
    a: &Answer,
    sent: &[Sent],
    strip: bool,
    start: u64,
) -> Result<(), String> {
    let ctx = || format!("request {r:?} to {path} ({id}) got {a:?}");
    let conditional = r.if_none_match.is_some() || r.if_modified_since.is_some();
    if a.status == 304 && !conditional {
        return Err(format!(
            "a 304 to a request without a conditional (RFC 9110 §15.4.5): {}",
            ctx()
        ));
    }
    if a.status == 206 && r.range.is_none() {
        return Err(format!(
            "a 206 to a request without Range (RFC 9110 §15.3.7): {}",
            ctx()
        ));
    }
    // A recipient with a clock adds Date to what it forwards (RFC 9110 §6.6.1); one line.
    if a.all("date").len() != 1 {
        return Err(format!("Date lines {:?}: {}", a.all("date"), ctx()));
    }
    // A 304's Content-Length is the selected representation's (RFC 9110 §8.6).
    if let (304, Some(cl)) = (a.status, a.header("content-length")) {
        let ok = sent
            .iter()
            .any(|s| s.path == path && representation(path, s.rep).len().to_string() == cl);
        if !ok {
            return Err(format!(
                "a 304's Content-Length of no representation: {}",
                ctx()
            ));
        }
    }
    if a.header("x-hop").is_some() {
        return Err(format!(
            "a field the origin's Connection lists was relayed (RFC 9110 §7.6.1): {}",
            ctx()
        ));
    }
    // Cookies only come back to the request they were set for.
    for c in a.all("set-cookie") {
        let Some(v) = c.strip_prefix("id=").and_then(|v| v.split(';').next()) else {
            return Err(format!("a Set-Cookie the origin did not send: {}", ctx()));
        };
        let from = sent.iter().find(|s| s.cookie.as_deref() == Some(v));
        match from {
            Some(s) if s.req_id.as_deref() == Some(id) => {}
            _ => {
                return Err(format!(
                    "Set-Cookie {v} set for another request ({from:?}): {}",
                    ctx()
                ))
            }
        }
    }
    // A 304 to `If-None-Match` names a tag it listed (RFC 9110 §13.1.2, §15.4.5).
    if a.status == 304 {
        if let Some(inm) = r.if_none_match.filter(|v| *v != "*") {
            let tag = a.header("etag").unwrap_or("");
            if !inm.split(',').any(|t| weak_eq(t, tag)) {
                return Err(format!(
                    "a 304 for a tag If-None-Match does not list: {}",
                    ctx()
                ));
            }
        }
    }
    if a.status == 416 && r.range.is_none() {
        return Err(format!("a 416 to a request without Range: {}", ctx()));
    }
    if a.status == 412 && r.if_match.is_none() {
        return Err(format!("a 412 to a request without If-Match: {}", ctx()));
    }
    // A 206 to a request with If-Range only when the validator matches: a strong entity tag
    // the same, or the date the representation's Last-Modified (RFC 9110 §13.1.5).
    if a.status == 206 {
        if let Some(v) = r.if_range {
            let ok = if v == "LM" {
                a.header("last-modified") == Some(http_date(lm_secs(start, 0)).as_str())
            } else {
                !v.starts_with("W/") && a.header("etag") == Some(v)
            };
            if !ok {
                return Err(format!(
                    "a 206 though If-Range does not match (RFC 9110 §13.1.5): {}",
                    ctx()
                ));
            }
        }
    }
    // A HEAD's Content-Length is that of a representation of the URL (RFC 9110 §8.6).
    if r.method == "HEAD" && matches!(a.status, 200 | 203) {
        if let Some(cl) = a.header("content-length") {
            let lens: Vec<String> = sent
                .iter()
                .filter(|s| s.path == path)
                .map(|s| representation(path, s.rep).len().to_string())
                .collect();
            if !lens.iter().any(|l| l == cl) {
                return Err(format!(
                    "a HEAD's Content-Length that no representation has: {}",
                    ctx()
                ));
            }
        }
    }
    // The origin's response this one is (or the last 304 that freshened it): one made for
    // this request, or one from the store (a stale one answered under
    // stale-while-revalidate among them, while its revalidation, sent with this request's
    // fields, goes on in the background).
    let source = a
        .header("x-serial")
        .and_then(|v| v.parse::<usize>().ok())
        .and_then(|i| sent.get(i));
    let asked = source.is_none_or(|s| s.req_id.as_deref() == Some(id));
    let by_origin = source.is_some_and(|s| s.req_id.as_deref() == Some(id));
    // (An unsafe method with it is written through: the cache has nothing to answer it
    // with, and RFC 9111 §4 has unsafe methods reach the origin.)
    if by_origin && r.cache_control == Some("only-if-cached") && matches!(r.method, "GET" | "HEAD")
    {
        return Err(format!(
            "only-if-cached sent to the origin (RFC 9111 §5.2.1.7): {}",
            ctx()
        ));
    }
    if let (false, Some(src)) = (asked, source) {
        REUSED.fetch_add(1, Ordering::Relaxed);
        check_reuse(r, path, id, a, src, sent, strip).map_err(|e| format!("{e}: {}", ctx()))?;
    }
    if r.method == "HEAD" || a.body.is_empty() {
        return Ok(());
    }
    let mine: Vec<&Sent> = sent.iter().filter(|s| s.path == path).collect();
    // Another URL's bytes.
    for s in sent.iter().filter(|s| s.path != path) {
        let tag = format!("[{} r", s.path);
        if contains(&a.body, tag.as_bytes()) {
            return Err(format!("another URL's body ({}): {}", s.path, ctx()));
        }
    }
    if a.status == 206 {
        if a.header("content-type")
            .is_some_and(|t| t.contains("multipart"))
        {
            return Ok(());
        }
        let cr = a
            .header("content-range")
            .ok_or_else(|| format!("a 206 without Content-Range: {}", ctx()))?;
        let (range, total) = cr
            .strip_prefix("bytes ")
            .and_then(|v| v.split_once('/'))
            .ok_or_else(|| format!("a 206 with a bad Content-Range: {}", ctx()))?;
        let (x, y) = range
            .split_once('-')
            .and_then(|(x, y)| Some((x.parse::<usize>().ok()?, y.parse::<usize>().ok()?)))
            .ok_or_else(|| format!("a 206 with a bad Content-Range: {}", ctx()))?;
        let total: usize = total
            .parse()
            .map_err(|_| format!("a 206 with a bad Content-Range: {}", ctx()))?;
        if x > y || y >= total || a.body.len() != y - x + 1 {
            return Err(format!(
                "a 206 whose body is not its Content-Range: {}",
                ctx()
            ));
        }
        let ok = mine.iter().any(|s| {
            let rep = representation(path, s.rep);
            rep.len() == total && rep[x..=y] == a.body[..]
        });
        if !ok {
            return Err(format!(
                "a 206 that is no range of a representation the origin sent for {path}: {}",
                ctx()
            ));
        }
        return Ok(());
    }
    let whole: Vec<&&Sent> = mine
        .iter()
        .filter(|s| representation(path, s.rep) == a.body)
        .collect();
    if whole.is_empty() {
        if contains(&a.body, b"[/c/") {
            return Err(format!(
                "a body that is no representation the origin sent for {path}: {}",
                ctx()
            ));
        }
        // A body the gateway made itself (an error page).
        return Ok(());
    }
    if !r.auth && whole.iter().all(|s| s.rep >= AUTH_REP && !s.shared) {
        return Err(format!(
            "a response made for a request with Authorization, not public / s-maxage / \
             must-revalidate, went to one without (RFC 9111 §3.5): {}",
            ctx()
        ));
    }
    Ok(())
}

/// A response from the store, the origin not asked (`src`: the response whose `x-serial` it
/// carries, the one stored or the last 304 that freshened it).
pub fn check_reuse(
    r: &ClientReq,
    path: &str,
    id: &str,
    a: &Answer,
    src: &Sent,
    sent: &[Sent],
    strip: bool,
) -> Result<(), String> {
    if !matches!(r.method, "GET" | "HEAD") {
        return Err("an unsafe method answered without the origin (RFC 9111 §4)".into());
    }
    if src.path != path {
        return Err(format!("the stored response of {} (RFC 9111 §4)", src.path));
    }
    for d in ["no-store", "private", "no-cache"] {
        // `must-understand` overrides `no-store` for a status the cache implements (RFC
        // 9111 §5.2.2.3; every status the origin sends here is one).
        let overridden = d == "no-store" && has_directive(&src.spec, "must-understand");
        if has_directive(&src.spec, "must-understand") && matches!(src.status, 299 | 599) {
            return Err(format!(
                "a {} with must-understand reused: a status this cache does not know (RFC \
                 9111 §3, §5.2.2.3)",
                src.status
            ));
        }
        if has_directive(&src.spec, d) && !overridden {
            return Err(format!(
                "a response with `{d}` reused without validation (RFC 9111 §5.2.2)"
            ));
        }
    }
    if src.req_no_store {
        return Err("a response to a request with no-store stored (RFC 9111 §5.2.1.5)".into());
    }
    if src.status != 304 && src.req_auth && !src.shared {
        return Err(
            "a response to a request with Authorization, not public / s-maxage / \
             must-revalidate, stored (RFC 9111 §3.5)"
                .into(),
        );
    }
    let private_secret = directives(&src.spec)
        .iter()
        .any(|(n, a)| n == "private" && a.as_deref() == Some("\"x-secret\""));
    if private_secret && a.header("x-secret").is_some() {
        return Err("a field private=\"x-secret\" names was stored (RFC 9111 §5.2.2.7)".into());
    }
    if src.cookie.is_some() && !strip {
        return Err("a response with Set-Cookie reused (the route's set_cookie = bypass)".into());
    }
    let vary: Vec<String> = src
        .spec
        .vary
        .unwrap_or("")
        .split(',')
        .map(|f| f.trim().to_ascii_lowercase())
        .collect();
    if vary.iter().any(|f| f == "*") {
        return Err("a response with Vary: * reused (RFC 9111 §4.1)".into());
    }
    if vary.iter().any(|f| f == "accept-encoding") && src.ae != accepted(r.accept_encoding) {
        return Err(format!(
            "the variant for Accept-Encoding {:?} reused (RFC 9111 §4.1)",
            src.ae
        ));
    }
    if vary.iter().any(|f| f == "accept-language")
        && src.al.as_deref() != r.accept_language.map(str::trim)
    {
        return Err(format!(
            "the variant for Accept-Language {:?} reused (RFC 9111 §4.1)",
            src.al
        ));
    }
    // The origin answered this request with an error: the stored response may stand in
    // under stale-if-error (RFC 5861 §4; the route's default on the epoll run). (With a
    // request's `no-cache` too: the validation it asks for was tried.)
    let errored = sent
        .iter()
        .any(|s| s.req_id.as_deref() == Some(id) && matches!(s.status, 500 | 502 | 503 | 504));
    let must_validate = matches!(r.cache_control, Some("no-cache" | "max-age=0"))
        || (r.pragma && r.cache_control.is_none());
    if must_validate && !errored {
        return Err(
            "reused without validation though the request says it must not be (RFC 9111 \
             §5.2.1.1, §5.2.1.4, §5.4)"
                .into(),
        );
    }
    if src.stale_by.is_some() && forbids_stale(&src.spec) {
        return Err(
            "a stale response with must-revalidate, proxy-revalidate or s-maxage served \
             without validation (RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10)"
                .into(),
        );
    }
    if let Some(st) = src.stale_by.filter(|_| !errored) {
        let allowed = match r.cache_control {
            Some("max-stale") => true,
            Some("max-stale=5") => st <= 5,
            _ => false,
        } || {
            let own = directives(&src.spec)
                .iter()
                .any(|(n, _)| n == "stale-while-revalidate");
            // Its own (60 s), else the route's (the epoll run), with a second of slack.
            let window = if own {
                60
            } else if strip {
                ROUTE_SWR
            } else {
                0
            };
            st <= window + 1
        };
        if !allowed {
            return Err(format!(
                "a response stale by {st} s or more served without validation (RFC 9111 \
                 §4.2.4)"
            ));
        }
    }
    let serial = sent
        .iter()
        .position(|s| std::ptr::eq(s, src))
        .expect("the source is in the list");
    if let Some(inv) = sent[serial + 1..]
        .iter()
        .find(|s| s.path == path && s.invalidates && req_index(s) < req_index_of(id))
    {
        return Err(format!(
            "a response stored before an unsafe method's {} reused (RFC 9111 §4.4)",
            inv.status
        ));
    }
    // The Age of a response from the store: one delta-seconds value, at least the age the
    // origin's fields give it (RFC 9111 §4.2.3, §5.1).
    let ages = a.all("age");
    let age = match ages[..] {
        [v] => v
            .parse::<u64>()
            .map_err(|_| format!("Age {v:?} from the store is no delta-seconds (RFC 9111 §5.1)"))?,
        _ => return Err(format!("Age lines {ages:?} from the store (RFC 9111 §5.1)")),
    };
    if src.status != 304 {
        let apparent: u64 = if src.spec.date == Some(1) {
            7200 - 2
        } else {
            0
        };
        let origin_age: u64 = match src.spec.age {
            Some("10") => 10,
            Some("99999") => 99_999,
            _ => 0,
        };
        if age < apparent.max(origin_age) {
            return Err(format!(
                "Age {age} from the store, below the age the origin's fields give (RFC 9111 \
                 §4.2.3)"
            ));
        }
    }
    Ok(())
}

/// The index in the case of the request `X-Req` names (`q<case>-<index>`).
pub fn req_index_of(id: &str) -> usize {
    id.rsplit('-')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap_or(usize::MAX)
}

pub fn req_index(s: &Sent) -> usize {
    s.req_id.as_deref().map_or(usize::MAX, req_index_of)
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Answers from the store without the origin, 206s and 304s the client got (both drivers).
pub static REUSED: AtomicUsize = AtomicUsize::new(0);
pub static PARTIAL: AtomicUsize = AtomicUsize::new(0);
pub static NOT_MODIFIED: AtomicUsize = AtomicUsize::new(0);

/// The route's cache settings for each driver's run: the defaults on io_uring; on epoll
/// `Set-Cookie` stripped from stored copies and the largest representation over
/// `max_object_bytes` (it streams through unstored).
pub fn cache_settings(d: DriverChoice) -> (&'static str, bool) {
    match d {
        DriverChoice::Epoll => (
            "enabled = true, set_cookie = \"strip\", max_object_bytes = \"64KiB\", \
             stale_while_revalidate = \"30s\", stale_if_error = \"30s\"",
            true,
        ),
        _ => ("enabled = true", false),
    }
}

/// The epoll run's route default `stale_while_revalidate` (RFC 5861 for responses that give
/// none), in seconds.
pub const ROUTE_SWR: u64 = 30;

/// Counts over a run.
#[derive(Default)]
pub struct Stats {
    pub answers: AtomicUsize,
    pub upstream: AtomicUsize,
    pub hits: AtomicUsize,
}

/// Gives the origin the case's response specs; returns the case's start (seconds).
pub fn begin_case(origin: &Mutex<OriginState>, case_no: usize, specs: &[OriginSpec]) -> u64 {
    let start = ringway::date::unix_millis() / 1000;
    *origin.lock().unwrap() = OriginState {
        case_no,
        specs: specs.to_vec(),
        next: 0,
        sent: Vec::new(),
        start,
    };
    start
}

impl Reader {
    /// A new connection to `addr` (reads time out after 10 s: a stuck gateway fails the case).
    pub fn connect(addr: SocketAddr) -> Reader {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.set_nodelay(true);
        Reader {
            s,
            buf: Vec::new(),
            eof: false,
        }
    }
}

/// Reads the answer to request `i` (counted in `stats`), with what the origin has sent so far.
pub fn next_answer(
    stats: &Stats,
    rd: &mut Reader,
    origin: &Mutex<OriginState>,
    r: &ClientReq,
    i: usize,
) -> Result<(Answer, Vec<Sent>), TestCaseError> {
    let a = match rd.answer(r.method == "HEAD") {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(TestCaseError::fail(format!(
                "request {i} ({r:?}) got no response: the connection ended"
            )))
        }
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "request {i} ({r:?}): malformed response: {e}"
            )))
        }
    };
    stats.answers.fetch_add(1, Ordering::Relaxed);
    match a.status {
        206 => PARTIAL.fetch_add(1, Ordering::Relaxed),
        304 => NOT_MODIFIED.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    if a.header("cache-status").is_some_and(|v| v.contains("hit")) {
        stats.hits.fetch_add(1, Ordering::Relaxed);
    }
    let sent = origin.lock().unwrap().sent.clone();
    Ok((a, sent))
}

/// The origin's response `a` carries (its `x-serial`), or the last 304 that freshened it.
pub fn source_of<'a>(a: &Answer, sent: &'a [Sent]) -> Option<(usize, &'a Sent)> {
    let k = a.header("x-serial")?.parse::<usize>().ok()?;
    Some((k, sent.get(k)?))
}

/// `a` answered request `id` from a store: the origin's response it carries was made for
/// another request.
pub fn answered_from_store(a: &Answer, sent: &[Sent], id: &str) -> bool {
    source_of(a, sent).is_some_and(|(_, s)| s.req_id.as_deref() != Some(id))
}

/// What the connection does after the answer `a` to request `i`: true when it ends there
/// (an error when it should and does not say so).
pub fn after_answer(r: &ClientReq, i: usize, a: &Answer) -> Result<bool, TestCaseError> {
    if r.http10 && a.header("transfer-encoding").is_some() {
        return Err(TestCaseError::fail(format!(
            "request {i}: chunked to an HTTP/1.0 client (RFC 9112 §6.1): {a:?}"
        )));
    }
    let keeps_10 = a.all("connection").iter().any(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
    });
    if a.closes() || (r.http10 && !keeps_10) {
        return Ok(true);
    }
    if r.close {
        return Err(TestCaseError::fail(format!(
            "request {i} asked for Connection: close, the answer does not say it: {a:?}"
        )));
    }
    Ok(false)
}

/// The end of a connection's requests: an open one still serves and holds no answer more
/// than the requests sent; a closed one sent nothing after the answer that closed it.
pub fn end_connection(rd: &mut Reader, closed: bool) -> Result<(), TestCaseError> {
    if !closed {
        let alive = b"GET /c/alive HTTP/1.1\r\nHost: fuzz.test\r\n\r\n";
        prop_assert!(rd.s.write_all(alive).is_ok(), "the connection ended");
        match rd.answer(false) {
            Ok(Some(a)) => prop_assert!(
                a.status == 200 && a.body == b"alive",
                "an answer more than the requests sent, or a lost one: {:?}",
                a
            ),
            other => prop_assert!(false, "the last request on the connection: {:?}", other),
        }
    } else {
        rd.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while rd.fill().map_err(TestCaseError::fail)? {}
        prop_assert!(
            rd.buf.is_empty(),
            "bytes after a closing answer: {:?}",
            rd.buf
        );
    }
    Ok(())
}

/// What reached the origin in the case (its requests from `seen_from` on): for a request
/// (`req_of(i)`: its request and whether the store answered it) its method, and its `Range`
/// only when it sent one (a background revalidation is a GET without the client's `Range`);
/// no request head from inside a request body (`smuggled`).
pub fn check_origin_saw<'a>(
    up: &Upstream,
    seen_from: usize,
    case_no: usize,
    smuggled: &str,
    req_of: impl Fn(usize) -> Option<(&'a ClientReq, bool)>,
) -> Result<(), TestCaseError> {
    let prefix = format!("/c/{case_no}/");
    let seen = up.seen.lock().unwrap();
    for q in seen[seen_from..].iter() {
        if !q.target.starts_with(&prefix) {
            continue;
        }
        let Some(i) = q.header("x-req").map(req_index_of) else {
            continue;
        };
        let Some((r, from_store)) = req_of(i) else {
            continue;
        };
        let why = if q.method == "HEAD" && (r.method != "HEAD" || from_store) {
            "a HEAD upstream for a request that was no HEAD, or answered from the store (its \
             background revalidation is a GET)"
        } else if q.method != "HEAD" && r.method == "HEAD" && q.method != "GET" {
            "another method upstream"
        } else if q.header("range").is_some() && r.range.is_none() {
            "a Range upstream the request did not send"
        } else {
            ""
        };
        prop_assert!(
            why.is_empty(),
            "{}: {:?} for request {} {:?}",
            why,
            String::from_utf8_lossy(&q.raw_head),
            i,
            r
        );
    }
    prop_assert!(
        !seen[seen_from..].iter().any(|q| q.target == smuggled),
        "a request head inside a body reached the origin"
    );
    Ok(())
}
