//! TOML configuration: typed with serde, unknown keys refused, validated once at load.
//!
//! Every error names the file, the line and column, the key (as a path such as
//! `routes[2].upstream`) and the reason. Names are resolved here, never on the request path.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::http::request::{self, MAX_HEADERS_CAP};

/// Longest `server.upgrade_socket` path (a Unix socket address holds 108 bytes with the NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

/// A configuration error: where, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.reason)
        } else {
            write!(f, ": key `{}`: {}", self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Value types with their own parsing (errors from these carry toml's position for free).

/// A duration written as a string with a unit: "250ms", "10s", "5m", "1h".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            de::Error::custom("expected a duration string such as \"10s\" or \"250ms\"")
        })?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

/// A duration where `"0s"` (any unit) means "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptDur(pub Option<Duration>);

impl<'de> Deserialize<'de> for OptDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            de::Error::custom("expected a duration string such as \"10s\" or \"0s\" (none)")
        })?;
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let zero = digits > 0 && t[..digits].bytes().all(|b| b == b'0');
        if zero && matches!(t[digits..].trim(), "ms" | "s" | "m" | "h") {
            return Ok(OptDur(None));
        }
        parse_duration(&s)
            .map(|d| OptDur(Some(d)))
            .map_err(de::Error::custom)
    }
}
/// Longest duration any key accepts: one day. Every `Dur` is at most this, so `Instant + d`,
/// the ejection-time doubling (×2^16 at most) and every other use of a configured duration stay
/// far from overflow. (The regression: `upstream_response = "18000000000000000000s"` passed
/// `ringway check` and aborted the process on the first proxied request.)
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Shortest `health_check.interval`: each endpoint gets at most ten checks a second, each on a
/// new connection (at 1 ms, a thousand connections a second per endpoint: a flood of the
/// upstream the gateway is meant to protect).
pub const MIN_HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(100);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: expected a number then ms, s, m or h"
        ));
    }
    let too_long = || format!("duration {s:?} is too long: at most 24h");
    // All digits: a parse failure can only be an overflow.
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let ms_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m or h"
            ))
        }
    };
    let ms = n.checked_mul(ms_per_unit).ok_or_else(too_long)?;
    let d = Duration::from_millis(ms);
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be above zero"));
    }
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// A size in bytes: an integer, or a string with a unit ("16KiB", "10MiB", "1GiB", "512B").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("expected a byte size: an integer or a string such as \"16KiB\"")
        })? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s).map(ByteSize).map_err(de::Error::custom),
        }
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unit must be B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A socket address, resolved when the config loads (a name such as "localhost:9000" becomes
/// its first address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub text: String,
    pub addr: SocketAddr,
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let addr = resolve(&text).map_err(de::Error::custom)?;
        Ok(Addr { text, addr })
    }
}

fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !text.contains(':') {
        return Err(format!("address {text:?} has no port (expected host:port)"));
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// An HTTP header name: a token, stored lower case.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeaderName(pub String);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        check_header_name(&s).map_err(de::Error::custom)?;
        Ok(HeaderName(s.to_ascii_lowercase()))
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_header_name(s: &str) -> Result<(), String> {
    if s.is_empty() || !s.bytes().all(is_tchar) {
        return Err(format!("{s:?} is not a valid header name"));
    }
    Ok(())
}

/// A field value written into a head (RFC 9110 §5.5): visible ASCII, obs-text, and SP/HTAB
/// between them; no CR, LF, NUL or other control character, no leading or trailing blank.
pub fn check_header_value(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    if let Some(c) = b.iter().find(|&&c| (c < 0x20 && c != b'\t') || c == 0x7f) {
        let what = match c {
            b'\r' | b'\n' => "CR or LF (it would end the header line)",
            0 => "NUL",
            _ => "a control character",
        };
        return Err(format!("header value {s:?} contains {what}"));
    }
    if b.first().is_some_and(|c| *c == b' ' || *c == b'\t')
        || b.last().is_some_and(|c| *c == b' ' || *c == b'\t')
    {
        return Err(format!(
            "header value {s:?} starts or ends with a blank (RFC 9110 §5.5)"
        ));
    }
    Ok(())
}

/// Header names the gateway writes itself because they frame the message or belong to one
/// hop (RFC 9110 §7.6.1, RFC 9112 §6): a configured rule or identity header with one of these
/// names could desynchronise the connection, so none may be added, set or removed by config.
pub const GATEWAY_OWNED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "expect",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers this hop writes about the client (see `crate::rewrite`) or for tracing: an identity
/// header may not take one of these names.
pub const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
];

fn check_not_gateway_owned(name: &str) -> Result<(), String> {
    if GATEWAY_OWNED_HEADERS.contains(&name) {
        return Err(format!(
            "{name:?} is written by the gateway itself (message framing or hop-by-hop, RFC 9110 \
             §7.6.1); it cannot be added, set or removed here"
        ));
    }
    Ok(())
}

/// A header the gateway fills with who the caller is (consumer, forwarded claims, mTLS
/// subject): not a gateway-owned or forwarding header, and no `_`, which CGI-style servers
/// treat as `-` (a client's `x-user-id` would then pass for an `x_user_id` identity header).
fn check_identity_header(name: &str) -> Result<(), String> {
    check_not_gateway_owned(name)?;
    if FORWARDING_HEADERS.contains(&name) {
        return Err(format!(
            "{name:?} is a forwarding header the gateway writes; pick another name"
        ));
    }
    if name.contains('_') {
        return Err(format!(
            "{name:?}: identity header names may not contain '_' (servers that treat '_' and \
             '-' alike would accept a client's copy under the other spelling)"
        ));
    }
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

fn is_sub_delim(b: u8) -> bool {
    b"!$&'()*+,;=".contains(&b)
}

/// Checks that every `%` starts a `%XX` escape (RFC 3986 §2.1) and every other byte passes
/// `ok`.
fn check_uri_chars(s: &str, ok: impl Fn(u8) -> bool) -> Result<(), usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() {
                return Err(i);
            }
            if !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return Err(i);
            }
            i += 3;
        } else if ok(b[i]) {
            i += 1;
        } else {
            return Err(i);
        }
    }
    Ok(())
}

/// A path written into a request target: `/` then path characters only (RFC 9112 §3.2.1
/// origin-form, RFC 3986 §3.3 pchar), without query or fragment. `allow_empty`: "" is
/// accepted (a `replace_prefix` that removes the prefix).
pub fn check_target_path(s: &str, allow_empty: bool) -> Result<(), String> {
    if s.is_empty() && allow_empty {
        return Ok(());
    }
    if !s.starts_with('/') {
        return Err(format!("{s:?} must start with '/'"));
    }
    let pchar = |b: u8| is_unreserved(b) || is_sub_delim(b) || b == b':' || b == b'@' || b == b'/';
    check_uri_chars(s, pchar).map_err(|i| {
        format!(
            "{s:?}: byte {} ({:?}) is not allowed in a request path (RFC 3986 §3.3: letters, \
             digits, -._~!$&'()*+,;=:@/ and %XX escapes)",
            i,
            s[i..].chars().next().unwrap_or(' ')
        )
    })
}

/// A route's path, prefix or replacement that no request path could spell differently: no
/// dot segment (`.` or `..`, also as `%2E` or with `;` parameters, which servlet containers
/// drop first). In `replace_prefix` one would send the upstream a target it resolves elsewhere
/// (RFC 3986 §5.2.4); in `path` and the prefixes the route could never match, since requests
/// with such paths are refused (400, `request::ambiguous_path`), and so could no `%XX` of an
/// unreserved character there. A prefix's last segment is partial: `/files/.` matches
/// `/files/.well-known`; a replacement's is not (`/pub/.` joined with `/x` is `/pub/./x`).
pub fn check_unambiguous(p: &str, key: &str) -> Result<(), String> {
    let replace = key == "replace_prefix";
    let mut segments: Vec<&str> = p.split('/').collect();
    if matches!(key, "path_prefix" | "strip_prefix") {
        segments.pop();
    }
    let dot = segments.iter().any(|seg| {
        let seg = seg.split(';').next().unwrap_or("");
        let seg = seg.replace("%2e", ".").replace("%2E", ".");
        seg == "." || seg == ".."
    });
    if dot {
        return Err(if replace {
            format!("{p:?} holds a dot segment: the upstream would resolve the rewritten path elsewhere (RFC 3986 §5.2.4)")
        } else {
            format!("{p:?} holds a dot segment: requests with such paths are refused (400), so the route could never match")
        });
    }
    let unreserved_escape = p.as_bytes().windows(3).any(|w| {
        let hex = |c: u8| (c as char).to_digit(16);
        match (w[0], hex(w[1]), hex(w[2])) {
            (b'%', Some(h), Some(l)) => is_unreserved((h * 16 + l) as u8),
            _ => false,
        }
    });
    // `%5C` and `%00` in any of them: requests with such paths are refused (400), and a
    // replacement holding one would send the upstream what the gateway refuses from clients
    // (a back end reads `%5C` as `/`, `%00` as the end of the path).
    let refused_escape = p
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && (w[1..].eq_ignore_ascii_case(b"5c") || &w[1..] == b"00"));
    if refused_escape {
        return Err(format!(
            "{p:?} holds %5C (a backslash) or %00 (NUL): requests with such paths are refused \
             (400), and an upstream reads them as `/` or as the end of the path"
        ));
    }
    if !replace && unreserved_escape {
        return Err(format!(
            "{p:?} holds a %XX escape of an unreserved character (RFC 3986 §2.3): requests with \
             such paths are refused (400), so the route could never match; write the character"
        ));
    }
    Ok(())
}

/// A request target for a request the gateway makes itself (health checks): an origin-form
/// path with an optional query (RFC 9112 §3.2.1).
pub fn check_origin_form(s: &str) -> Result<(), String> {
    let (path, query) = match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    };
    check_target_path(path, false)?;
    if let Some(q) = query {
        let qchar = |b: u8| is_unreserved(b) || is_sub_delim(b) || b":@/?".contains(&b);
        check_uri_chars(q, qchar).map_err(|i| {
            format!(
                "{s:?}: the query holds a character not allowed there (RFC 3986 §3.4) at byte {}",
                path.len() + 1 + i
            )
        })?;
    }
    Ok(())
}

/// A `Host` value: `uri-host [ ":" port ]` (RFC 9110 §7.2): a reg-name (letters, digits,
/// -._~, sub-delims, %XX) or a bracketed IPv6 literal, then an optional decimal port.
pub fn check_host_value(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{s:?} is not a host: expected name[:port], IPv4[:port] or [IPv6][:port] (RFC 9110 §7.2)"
        )
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or_else(bad)?;
        let lit = &rest[..end];
        if lit.is_empty()
            || !lit
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(bad());
        }
        let after = &rest[end + 1..];
        match after.strip_prefix(':') {
            Some(p) => (lit, Some(p)),
            None if after.is_empty() => (lit, None),
            None => return Err(bad()),
        }
    } else {
        let (h, p) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if h.is_empty() {
            return Err(bad());
        }
        check_uri_chars(h, |b| is_unreserved(b) || is_sub_delim(b)).map_err(|_| bad())?;
        (h, p)
    };
    if host.is_empty() {
        return Err(bad());
    }
    if let Some(p) = port {
        if p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u32>().map_or(true, |n| n > 65535)
        {
            return Err(bad());
        }
    }
    Ok(())
}

/// The pseudonym in `Via` (RFC 9110 §7.6.3: `received-by = pseudonym [ ":" port ]`, pseudonym
/// a token).
fn check_via(s: &str) -> Result<(), String> {
    let (name, port) = match s.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (s, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    if name.is_empty() || !name.bytes().all(is_tchar) || !port_ok {
        return Err(format!(
            "{s:?} is not a Via pseudonym: a token (letters, digits, !#$%&'*+-.^_`|~), optionally \
             followed by :port (RFC 9110 §7.6.3)"
        ));
    }
    Ok(())
}

/// A URL the gateway fetches itself (JWKS, introspection): its authority goes into `Host` and
/// its path into the request target.
fn check_fetch_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let (authority, target) = match rest.find('/') {
        Some(p) => (&rest[..p], &rest[p..]),
        None => (rest, "/"),
    };
    check_host_value(authority).map_err(|e| format!("{url:?}: {e}"))?;
    check_origin_form(target).map_err(|e| format!("{url:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Trusted proxies (RFC 7239 §8.3, and the X-Forwarded-* headers).

/// Peers whose forwarding headers (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`) ringway believes:
/// addresses or CIDR blocks from `[server] trusted_proxies`, parsed at load. Empty by default:
/// every client's copies of those headers are replaced by what this hop saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    /// (network, prefix length), the network already masked.
    v4: Vec<(u32, u8)>,
    v6: Vec<(u128, u8)>,
}

/// Most entries `trusted_proxies` may list (each connection scans them once).
pub const MAX_TRUSTED_PROXIES: usize = 256;

impl TrustedProxies {
    /// Parses "10.0.0.0/8", "127.0.0.1", "::1/128", "fd00::/8".
    pub fn parse_entry(&mut self, s: &str) -> Result<(), String> {
        use std::net::IpAddr;
        let bad = |why: &str| format!("{s:?} is not an address or CIDR block: {why}");
        let (ip, len) = match s.split_once('/') {
            Some((a, l)) => {
                let ip: IpAddr = a.parse().map_err(|_| bad("bad address"))?;
                if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("the prefix length is not a number"));
                }
                let len: u8 = l
                    .parse()
                    .map_err(|_| bad("the prefix length is not a number"))?;
                (ip, Some(len))
            }
            None => (s.parse().map_err(|_| bad("bad address"))?, None),
        };
        match ip {
            IpAddr::V4(a) => {
                let len = len.unwrap_or(32);
                if len > 32 {
                    return Err(bad("an IPv4 prefix length is at most 32"));
                }
                let net = u32::from(a) & mask32(len);
                if net != u32::from(a) {
                    return Err(bad(
                        "host bits are set after the prefix (write the network address)",
                    ));
                }
                self.v4.push((net, len));
            }
            IpAddr::V6(a) => {
                let len = len.unwrap_or(128);
                if len > 128 {
                    return Err(bad("an IPv6 prefix length is at most 128"));
                }
                let net = u128::from(a) & mask128(len);
                if net != u128::from(a) {
                    return Err(bad(
                        "host bits are set after the prefix (write the network address)",
                    ));
                }
                self.v6.push((net, len));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The entries in CIDR notation (for the admin API's `/config`).
    pub fn entries(&self) -> Vec<String> {
        let v4 = self
            .v4
            .iter()
            .map(|(n, l)| format!("{}/{l}", std::net::Ipv4Addr::from(*n)));
        let v6 = self
            .v6
            .iter()
            .map(|(n, l)| format!("{}/{l}", std::net::Ipv6Addr::from(*n)));
        v4.chain(v6).collect()
    }

    /// Is `ip` one of the trusted proxies? An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
    /// is looked up as the IPv4 address it carries. No allocation.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|&(net, len)| a & mask32(len) == net)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|&(net, len)| a & mask128(len) == net)
            }
        }
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

impl<'de> Deserialize<'de> for TrustedProxies {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// One entry, so that a bad one is reported with its own position.
        struct Entry(String);
        impl<'de> Deserialize<'de> for Entry {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                TrustedProxies::default()
                    .parse_entry(&s)
                    .map_err(de::Error::custom)?;
                Ok(Entry(s))
            }
        }
        let entries = Vec::<Entry>::deserialize(d)?;
        if entries.len() > MAX_TRUSTED_PROXIES {
            return Err(de::Error::custom(format!(
                "at most {MAX_TRUSTED_PROXIES} entries (use CIDR blocks)"
            )));
        }
        let mut t = TrustedProxies::default();
        for e in entries {
            t.parse_entry(&e.0).map_err(de::Error::custom)?;
        }
        Ok(t)
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration tree.

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub rate_limiting: RateLimitingConfig,
    /// Credential providers: API keys, JWT, OAuth2 introspection.
    #[serde(default)]
    pub auth: crate::auth::config::AuthConfig,
    /// Callers known by name: API keys (as hashes) and JWT subjects.
    #[serde(default)]
    pub consumers: Vec<crate::auth::config::ConsumerConfig>,
    /// The admin API listener (`crate::admin`); off unless the section is present.
    #[serde(default)]
    pub admin: Option<crate::admin::config::AdminConfig>,
    /// Response cache budgets (see `crate::cache`).
    #[serde(default)]
    pub cache: crate::cache::config::CacheConfig,
    /// Per-request metrics (`crate::metrics`).
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
    /// The access log (`crate::access_log`); a listener's own table replaces it.
    #[serde(default)]
    pub access_log: crate::access_log::AccessLogConfig,
    /// The event log: level and format (`crate::log`).
    #[serde(default)]
    pub log: crate::log::LogConfig,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    /// io_uring where the kernel allows it, epoll otherwise.
    #[default]
    Auto,
    /// io_uring; falls back to epoll (with a log line) where the kernel refuses it.
    IoUring,
    /// monoio's epoll ("legacy") driver.
    Epoll,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Worker threads, one event loop each; 0 means one per available CPU.
    #[serde(default)]
    pub workers: usize,
    #[serde(default)]
    pub driver: DriverChoice,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown")]
    pub shutdown_timeout: Dur,
    /// The pseudonym added to `Via` headers.
    #[serde(default = "default_via")]
    pub via: String,
    /// Most client connections one worker keeps open; at the cap a worker stops accepting
    /// (the kernel's backlog holds new connections) until one closes. 0: derived from the
    /// file-descriptor limit at start (less a reserve, shared by the workers).
    #[serde(default)]
    pub max_connections_per_worker: usize,
    /// Peers (addresses or CIDR blocks) whose forwarding headers are believed and extended;
    /// anyone else's are replaced (see `crate::rewrite`). Default: none.
    #[serde(default)]
    pub trusted_proxies: TrustedProxies,
    /// Unix socket on which the running process hands its listening sockets to a new one
    /// (`ringway upgrade`; see `crate::upgrade`). Default: none (no binary upgrade).
    #[serde(default)]
    pub upgrade_socket: Option<String>,
}

fn default_shutdown() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_via() -> String {
    "ringway".into()
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: 0,
            driver: DriverChoice::Auto,
            shutdown_timeout: default_shutdown(),
            via: default_via(),
            max_connections_per_worker: 0,
            trusted_proxies: TrustedProxies::default(),
            upgrade_socket: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "d_head")]
    pub max_head_bytes: ByteSize,
    #[serde(default = "d_headers")]
    pub max_headers: usize,
    #[serde(default = "d_uri")]
    pub max_uri_bytes: ByteSize,
    #[serde(default = "d_body")]
    pub max_body_bytes: ByteSize,
}
fn d_head() -> ByteSize {
    ByteSize(request::DEFAULT_MAX_HEAD_BYTES as u64)
}
fn d_headers() -> usize {
    request::DEFAULT_MAX_HEADERS
}
fn d_uri() -> ByteSize {
    ByteSize(request::DEFAULT_MAX_URI_BYTES as u64)
}
fn d_body() -> ByteSize {
    ByteSize(request::DEFAULT_MAX_BODY_BYTES)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_head_bytes: d_head(),
            max_headers: d_headers(),
            max_uri_bytes: d_uri(),
            max_body_bytes: d_body(),
        }
    }
}

impl LimitsConfig {
    pub fn to_limits(&self) -> request::Limits {
        request::Limits {
            max_head_bytes: self.max_head_bytes.0 as usize,
            max_headers: self.max_headers,
            max_uri_bytes: self.max_uri_bytes.0 as usize,
            max_body_bytes: self.max_body_bytes.0,
            ..request::Limits::default()
        }
    }
}

macro_rules! dur_default {
    ($name:ident, $ms:expr) => {
        fn $name() -> Dur {
            Dur(Duration::from_millis($ms))
        }
    };
}
dur_default!(d_client_head, 10_000);
dur_default!(d_client_idle, 60_000);
dur_default!(d_client_body, 30_000);
dur_default!(d_client_write, 60_000);
dur_default!(d_up_connect, 3_000);
dur_default!(d_up_response, 30_000);
dur_default!(d_up_body, 30_000);
dur_default!(d_up_write, 30_000);
fn d_client_body_total() -> OptDur {
    OptDur(Some(Duration::from_secs(300)))
}
fn d_up_body_total() -> OptDur {
    OptDur(None)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// From a request's first byte until its head is complete (slowloris guard): 408.
    #[serde(default = "d_client_head")]
    pub client_head: Dur,
    /// A keep-alive connection waiting for its next request; closed silently after it.
    #[serde(default = "d_client_idle")]
    pub client_idle: Dur,
    /// Longest pause between two reads of a request body: 408.
    #[serde(default = "d_client_body")]
    pub client_body: Dur,
    /// Longest wait for the client to accept response bytes; the connection is closed after it.
    #[serde(default = "d_client_write")]
    pub client_write: Dur,
    /// TCP connect to an upstream endpoint: 504.
    #[serde(default = "d_up_connect")]
    pub upstream_connect: Dur,
    /// From the request being sent until the upstream's response head: 504.
    #[serde(default = "d_up_response")]
    pub upstream_response: Dur,
    /// Longest pause between two reads of an upstream response body: the response is cut.
    #[serde(default = "d_up_body")]
    pub upstream_body: Dur,
    /// Longest wait for the upstream to accept request bytes (head or body): 502/504.
    #[serde(default = "d_up_write")]
    pub upstream_write: Dur,
    /// Deadline for a whole request body, however steadily it trickles in: 408. `0s`: none.
    #[serde(default = "d_client_body_total")]
    pub client_body_total: OptDur,
    /// Deadline for a whole upstream response body (the response is cut after it). `0s`
    /// (the default): none, so long downloads and event streams are not cut.
    #[serde(default = "d_up_body_total")]
    pub upstream_body_total: OptDur,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            client_head: d_client_head(),
            client_idle: d_client_idle(),
            client_body: d_client_body(),
            client_write: d_client_write(),
            upstream_connect: d_up_connect(),
            upstream_response: d_up_response(),
            upstream_body: d_up_body(),
            upstream_write: d_up_write(),
            client_body_total: d_client_body_total(),
            upstream_body_total: d_up_body_total(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub address: Addr,
    #[serde(default = "d_backlog")]
    pub backlog: u32,
    /// TLS termination on this listener.
    #[serde(default)]
    pub tls: Option<ListenerTlsConfig>,
    /// Answer every request on this (plain) listener with a 308 to the same URL over https.
    #[serde(default)]
    pub redirect_https: Option<RedirectHttpsConfig>,
    /// Accept TRACE requests (and forward them). Off: TRACE gets a 405, as in nginx.
    #[serde(default)]
    pub allow_trace: bool,
    /// Keep request header lines whose name holds `_`. Off: they are dropped before routing,
    /// auth and forwarding, as nginx's `underscores_in_headers off` does.
    #[serde(default)]
    pub allow_underscores_in_headers: bool,
    /// This listener's access log, replacing `[access_log]` for its requests.
    #[serde(default)]
    pub access_log: Option<crate::access_log::AccessLogConfig>,
}
fn d_backlog() -> u32 {
    1024
}

impl ListenerConfig {
    /// The request-parsing limits for this listener: the global `[limits]` with the
    /// listener's own switches.
    pub fn request_limits(&self, global: request::Limits) -> request::Limits {
        request::Limits {
            allow_trace: self.allow_trace,
            allow_underscores_in_headers: self.allow_underscores_in_headers,
            tls: self.tls.is_some(),
            ..global
        }
    }
}

/// TLS on a listener: certificates chosen by SNI, versions, resumption, client certificates.
/// Files are PEM, read when the config loads (paths relative to the working directory).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Chain + key pairs. The first is the default (no SNI, or no name matches).
    pub certificates: Vec<CertKeyConfig>,
    /// Lowest protocol version accepted: "1.2" (default) or "1.3".
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Sessions kept for resumption by session id (TLS 1.2), shared by the workers; 0 turns
    /// the cache off (tickets still resume).
    #[serde(default = "d_session_cache")]
    pub session_cache: usize,
    /// Stateless resumption tickets (keys rotated every 6 hours, never written to disk).
    #[serde(default = "d_true")]
    pub session_tickets: bool,
    /// Client certificates (mTLS).
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
}
fn d_session_cache() -> usize {
    4096
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertKeyConfig {
    /// The certificate chain, leaf first.
    pub cert: String,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// The handshake fails without a certificate from one of the CAs.
    #[default]
    Required,
    /// A certificate is verified when sent; routes decide with `require_client_cert`.
    Optional,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// CA bundle (PEM) that client certificates must chain to.
    pub ca: String,
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Header that carries the verified certificate's subject upstream. A copy sent by the
    /// client is always removed.
    #[serde(default = "d_subject_header")]
    pub subject_header: HeaderName,
}
fn d_subject_header() -> HeaderName {
    HeaderName("x-client-cert-subject".into())
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectHttpsConfig {
    /// Port in the Location URL; absent or 443: none written.
    #[serde(default)]
    pub port: Option<u16>,
}

/// TLS to an upstream group's endpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA bundle (PEM) that the endpoints' certificates must chain to; absent: the Mozilla
    /// roots built into ringway (webpki-roots).
    #[serde(default)]
    pub ca: Option<String>,
    /// Name sent as SNI and verified in the certificate; default: the endpoint's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// Client certificate chain and key presented to the endpoints.
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
    /// `false` accepts any certificate (testing only: it gives up on authentication).
    #[serde(default = "d_true")]
    pub verify: bool,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    /// Fewest requests in flight (this worker's view), weighted.
    LeastRequest,
    /// Power of two random choices on peak-EWMA latency × (in-flight + 1).
    PeakEwma,
    /// Maglev consistent hashing on `hash_on`.
    ConsistentHash,
}

/// What consistent hashing hashes: "client_ip", "header:NAME" or "cookie:NAME".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    ClientIp,
    Header(String),
    Cookie(String),
}

impl<'de> Deserialize<'de> for HashOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        if let Some(h) = s.strip_prefix("header:") {
            check_header_name(h).map_err(de::Error::custom)?;
            return Ok(HashOn::Header(h.to_ascii_lowercase()));
        }
        if let Some(c) = s.strip_prefix("cookie:") {
            if c.is_empty() || !c.bytes().all(is_tchar) {
                return Err(de::Error::custom(format!("{c:?} is not a cookie name")));
            }
            return Ok(HashOn::Cookie(c.to_string()));
        }
        Err(de::Error::custom(format!(
            "{s:?}: expected \"client_ip\", \"header:NAME\" or \"cookie:NAME\""
        )))
    }
}

/// Active HTTP health checks, run once per gateway (not per worker).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "d_hc_path")]
    pub path: String,
    /// Host header of the check; default: the endpoint's address.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "d_hc_interval")]
    pub interval: Dur,
    #[serde(default = "d_hc_timeout")]
    pub timeout: Dur,
    /// Consecutive passing checks that bring an endpoint back.
    #[serde(default = "d_two")]
    pub healthy_threshold: u32,
    /// Consecutive failing checks that take an endpoint out.
    #[serde(default = "d_three")]
    pub unhealthy_threshold: u32,
    /// Statuses that pass; default 200-399.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
}
fn d_hc_path() -> String {
    "/".into()
}
dur_default!(d_hc_interval, 2_000);
dur_default!(d_hc_timeout, 1_000);
fn d_two() -> u32 {
    2
}
fn d_three() -> u32 {
    3
}

/// Passive outlier detection: endpoints that keep failing are ejected for a while.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive failures (connect errors, resets, timeouts, 5xx) seen by one worker that
    /// eject an endpoint; 0 turns outlier detection off.
    #[serde(default = "d_five")]
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each further ejection, up to `max_ejection_time`.
    #[serde(default = "d_base_ejection")]
    pub base_ejection_time: Dur,
    #[serde(default = "d_max_ejection")]
    pub max_ejection_time: Dur,
    /// Most endpoints of the group ejected at once, in percent (at least one stays).
    #[serde(default = "d_fifty")]
    pub max_ejection_percent: u32,
}
fn d_five() -> u32 {
    5
}
dur_default!(d_base_ejection, 5_000);
dur_default!(d_max_ejection, 300_000);
fn d_fifty() -> u32 {
    50
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: d_five(),
            base_ejection_time: d_base_ejection(),
            max_ejection_time: d_max_ejection(),
            max_ejection_percent: d_fifty(),
        }
    }
}

/// Circuit breaker of an upstream group. Limits count per worker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Open upstream connections (pooled and in use).
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection when `max_connections` is reached.
    #[serde(default)]
    pub max_pending: Option<u32>,
    /// Requests in flight.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Failure ratio (0..1) over `window` that opens the breaker.
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// Requests the window needs before `error_rate` is judged.
    #[serde(default = "d_min_requests")]
    pub min_requests: u32,
    #[serde(default = "d_window")]
    pub window: Dur,
    /// Time spent open before letting probes through (half-open).
    #[serde(default = "d_open_for")]
    pub open_for: Dur,
    /// Probe requests allowed while half-open; all must succeed to close.
    #[serde(default = "d_three")]
    pub half_open_probes: u32,
}
fn d_min_requests() -> u32 {
    20
}
dur_default!(d_window, 10_000);
dur_default!(d_open_for, 5_000);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default)]
    pub balance: Balance,
    /// Idle keep-alive connections kept per endpoint, per worker: `"auto"` (follows the
    /// concurrency the worker has seen) or a fixed number (0: no pooling).
    #[serde(default)]
    pub max_idle: IdleCap,
    /// An idle pooled connection older than this is closed.
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout: Dur,
    /// Key for `balance = "consistent_hash"` (default: client_ip).
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
    /// TLS to the endpoints.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
}
/// How many idle connections a pool keeps per endpoint and worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IdleCap {
    /// As many as the requests this worker recently had in flight to the endpoint (at least
    /// 64, at most the worker's share of file descriptors).
    #[default]
    Auto,
    Fixed(usize),
}

impl<'de> Deserialize<'de> for IdleCap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let bad = || de::Error::custom("expected \"auto\" or a number of connections");
        match Raw::deserialize(d).map_err(|_| bad())? {
            // Bounded by `validate` (MAX_IDLE_PER_ENDPOINT), which names the line.
            Raw::N(n) => Ok(IdleCap::Fixed(usize::try_from(n).unwrap_or(usize::MAX))),
            Raw::S(s) if s == "auto" => Ok(IdleCap::Auto),
            Raw::S(_) => Err(bad()),
        }
    }
}
dur_default!(d_idle_timeout, 30_000);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: Addr,
    #[serde(default = "d_weight")]
    pub weight: u32,
}
fn d_weight() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Appended (a second line if the header exists).
    #[serde(default)]
    pub add: BTreeMap<HeaderName, String>,
    /// Replaces every existing line of the header.
    #[serde(default)]
    pub set: BTreeMap<HeaderName, String>,
    /// Removed.
    #[serde(default)]
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectConfig {
    #[serde(default = "d_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<HeaderName, String>,
}
fn d_status() -> u16 {
    200
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Host names: exact ("api.example.com") or a suffix wildcard ("*.example.com").
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_regex: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<HeaderName, String>,
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub direct: Option<DirectConfig>,
    /// Several upstream calls answered as one JSON document (see `crate::compose`).
    #[serde(default)]
    pub compose: Option<crate::compose::ComposeConfig>,
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub replace_prefix: Option<String>,
    #[serde(default = "d_true")]
    pub preserve_host: bool,
    #[serde(default)]
    pub set_host: Option<String>,
    #[serde(default)]
    pub request_headers: HeaderOps,
    #[serde(default)]
    pub response_headers: HeaderOps,
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Per-route overrides of the global timeouts.
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    /// Token-bucket limits; a request must pass all of them.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Most requests of this route in flight at once, gateway-wide (per key).
    #[serde(default)]
    pub concurrency: Option<ConcurrencyConfig>,
    /// Request quotas per calendar day or month (UTC); kept in Redis with that backend.
    #[serde(default)]
    pub quotas: Vec<QuotaConfig>,
    /// Only requests with a verified client certificate (mTLS) pass; others get a 403.
    #[serde(default)]
    pub require_client_cert: bool,
    /// Who may call this route: "none", "api_key", a provider name, or a table with `any_of`
    /// and scopes/roles (see `crate::auth`).
    #[serde(default)]
    pub auth: Option<crate::auth::config::RouteAuth>,
    /// Trailer fields of chunked request bodies: "drop" (default) or "forward" (only the
    /// fields RFC 9110 §6.5.1 allows in a trailer).
    #[serde(default)]
    pub trailers: TrailersConfig,
    /// Response caching for this route (see `crate::cache`).
    #[serde(default)]
    pub cache: Option<crate::cache::config::RouteCacheConfig>,
}

/// What a route does with the trailer fields of a chunked request body.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrailersConfig {
    /// None is forwarded.
    #[default]
    Drop,
    /// Forwarded, less the fields that may not appear in a trailer and hop-by-hop ones.
    Forward,
}

impl TrailersConfig {
    pub fn policy(self) -> crate::http::chunked::TrailerPolicy {
        match self {
            TrailersConfig::Drop => crate::http::chunked::TrailerPolicy::Drop,
            TrailersConfig::Forward => crate::http::chunked::TrailerPolicy::Filter,
        }
    }
}

/// A quota: at most `limit` requests per key per calendar period.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Policy name in the RateLimit headers; default: the period ("day", "month").
    #[serde(default)]
    pub name: Option<String>,
    pub key: RateKey,
    pub limit: u32,
    pub period: QuotaPeriod,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    Day,
    Month,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    pub max: u32,
    #[serde(default = "d_route_key")]
    pub key: RateKey,
}
fn d_route_key() -> RateKey {
    RateKey::Route
}

/// What a rate limit counts by: "client_ip", "route" or "header:NAME".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    Route,
    Header(String),
    /// The consumer the route's auth policy identified (client address when there is none).
    Consumer,
    /// A claim of the verified token (client address when the token has no such claim).
    Claim(String),
}

impl RateKey {
    /// Keys that need an authenticated caller.
    pub fn needs_auth(&self) -> bool {
        matches!(self, RateKey::Consumer | RateKey::Claim(_))
    }

    /// The name of a rate limit that has none: its key's.
    pub fn default_name(&self) -> String {
        match self {
            RateKey::ClientIp => "client_ip".into(),
            RateKey::Route => "route".into(),
            RateKey::Header(h) => h.clone(),
            RateKey::Consumer => "consumer".into(),
            RateKey::Claim(c) => c.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "client_ip" => Ok(RateKey::ClientIp),
            "route" => Ok(RateKey::Route),
            "consumer" => Ok(RateKey::Consumer),
            _ => {
                if let Some(h) = s.strip_prefix("header:") {
                    check_header_name(h).map_err(de::Error::custom)?;
                    Ok(RateKey::Header(h.to_ascii_lowercase()))
                } else if let Some(c) = s.strip_prefix("claim:").filter(|c| !c.is_empty()) {
                    Ok(RateKey::Claim(c.to_string()))
                } else {
                    Err(de::Error::custom(format!(
                        "{s:?}: expected \"client_ip\", \"route\", \"consumer\", \"header:NAME\" or \"claim:NAME\""
                    )))
                }
            }
        }
    }
}

/// Most rate limits one route may carry.
pub const MAX_RATE_LIMITS_PER_ROUTE: usize = 8;

/// A token bucket: `rate` requests per `per`, bursts up to `burst`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Policy name in the RateLimit headers; default: the key.
    #[serde(default)]
    pub name: Option<String>,
    pub key: RateKey,
    pub rate: u32,
    #[serde(default = "d_per")]
    pub per: Dur,
    /// Bucket size; default: `rate`.
    #[serde(default)]
    pub burst: Option<u32>,
}
dur_default!(d_per, 1_000);

/// Host-wide rate-limiting settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitingConfig {
    /// Keys (per limit) kept in memory; the least recently used are evicted beyond it.
    #[serde(default = "d_max_keys")]
    pub max_keys: usize,
    /// Where the buckets live: "local" (this host) or "redis" (shared by every gateway
    /// pointed at the same Redis).
    #[serde(default)]
    pub backend: RateBackend,
    /// Required with `backend = "redis"`.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
}
fn d_max_keys() -> usize {
    100_000
}

impl Default for RateLimitingConfig {
    fn default() -> Self {
        RateLimitingConfig {
            max_keys: d_max_keys(),
            backend: RateBackend::Local,
            redis: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateBackend {
    #[default]
    Local,
    Redis,
}

/// What a gateway does while Redis cannot be reached.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailure {
    /// Fail open: every host applies the limits on its own local buckets.
    #[default]
    Local,
    /// Fail closed: requests on limited routes get 503 until Redis answers again.
    Deny,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `host:port` of the Redis server.
    pub address: Addr,
    /// Sent with AUTH after connecting, when set.
    #[serde(default)]
    pub password: Option<String>,
    /// Longest wait for one round trip (connect, or a pipeline of commands); a request waits
    /// at most this long for Redis before the failure policy applies.
    #[serde(default = "d_redis_timeout")]
    pub timeout: Dur,
    #[serde(default)]
    pub on_failure: RedisFailure,
    /// Prefix of every key ringway writes.
    #[serde(default = "d_redis_prefix")]
    pub key_prefix: String,
    /// How often an unreachable Redis is tried again.
    #[serde(default = "d_redis_retry")]
    pub retry_interval: Dur,
}
dur_default!(d_redis_timeout, 50);
dur_default!(d_redis_retry, 1_000);
fn d_redis_prefix() -> String {
    "ringway:".into()
}

/// When and how a route retries a failed upstream request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included.
    #[serde(default = "d_attempts")]
    pub attempts: u32,
    /// Conditions: "connect_failure", "reset", "timeout", "502", "503", "504".
    #[serde(default = "d_retry_on")]
    pub on: Vec<String>,
    /// Backoff before try n is random in [0, min(max, base × 2^(n-2))] (full jitter).
    #[serde(default = "d_backoff_base")]
    pub backoff_base: Dur,
    #[serde(default = "d_backoff_max")]
    pub backoff_max: Dur,
    /// Retries may add at most this percentage on top of the route's requests (per worker,
    /// over the last 10 s).
    #[serde(default = "d_budget")]
    pub budget_percent: u32,
    /// Retries always allowed per second, whatever the budget says.
    #[serde(default = "d_three")]
    pub min_retries_per_second: u32,
    /// Retry non-idempotent methods (POST, PATCH) on conditions other than connect_failure.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Request bodies up to this size are kept for replay; larger ones are streamed and
    /// never retried.
    #[serde(default = "d_replay")]
    pub max_replay_bytes: ByteSize,
}
fn d_attempts() -> u32 {
    2
}
fn d_retry_on() -> Vec<String> {
    vec!["connect_failure".into(), "reset".into(), "503".into()]
}
dur_default!(d_backoff_base, 25);
dur_default!(d_backoff_max, 250);
fn d_budget() -> u32 {
    20
}
fn d_replay() -> ByteSize {
    ByteSize(64 * 1024)
}

pub const RETRY_CONDITIONS: &[&str] = &["connect_failure", "reset", "timeout", "502", "503", "504"];

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    pub client_body: Option<Dur>,
    pub client_write: Option<Dur>,
    pub upstream_connect: Option<Dur>,
    pub upstream_response: Option<Dur>,
    pub upstream_body: Option<Dur>,
}
fn d_true() -> bool {
    true
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Most worker threads (`server.workers`).
pub const MAX_WORKERS: usize = 1024;
/// Largest `listen(2)` backlog (Linux caps it at `net.core.somaxconn` anyway).
pub const MAX_BACKLOG: u32 = 65_535;
/// Largest request body limit (`limits.max_body_bytes`, a route's `max_body_bytes`): 1 TiB.
pub const MAX_BODY_BYTES: u64 = 1 << 40;
/// Largest body kept in memory for a retry (`retry.max_replay_bytes`): 16 MiB.
pub const MAX_REPLAY_BYTES: u64 = 16 << 20;
/// Most TLS sessions kept for resumption (`tls.session_cache`).
pub const MAX_SESSION_CACHE: usize = 1 << 20;
/// Most idle connections pooled per endpoint and worker (`max_idle`).
pub const MAX_IDLE_PER_ENDPOINT: usize = 4096;
/// Most entries of a per-worker or host-wide map (`rate_limiting.max_keys`, `auth.cache_size`).
pub const MAX_CACHE_ENTRIES: usize = 10_000_000;
/// Most introspection calls in flight per worker.
pub const MAX_INTROSPECTION_CONCURRENT: usize = 65_536;
/// Largest `retry.budget_percent`.
pub const MAX_RETRY_BUDGET_PERCENT: u32 = 1000;
/// Longest Redis key prefix.
pub const MAX_KEY_PREFIX: usize = 128;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let label = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: label.clone(),
            line: None,
            column: None,
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        let src = String::from_utf8(bytes).map_err(|e| not_utf8(&label, e))?;
        Config::parse(&src, &label)
    }

    /// Settings that load but are likely a mistake, one line each: `ringway check` prints
    /// them and the gateway logs them at start and on each reload it applies. Never an error.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.auth.warnings();
        w.extend(self.cache.warnings());
        w
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(src);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = match inner.span() {
                Some(span) => {
                    let (l, c) = line_col(src, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            // `Spanned` values (the upstream names, for their position) show up in the path
            // under serde's private field name: not part of the key the user wrote.
            let key = key.replace(".$__serde_spanned_private_value", "");
            let key = match (key.as_str(), inner.span()) {
                // A syntax error (a number too large for TOML's i64, a bad escape) comes with
                // a position but no path: the key written there.
                (".", Some(span)) => key_at(src, span.start),
                (".", None) => String::new(),
                _ => key,
            };
            ConfigError {
                file: file.to_string(),
                line,
                column,
                key,
                reason: inner.message().trim().to_string(),
            }
        })?;
        cfg.validate(src, file)?;
        Ok(cfg)
    }

    fn validate(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let err = |key: String, span: Option<std::ops::Range<usize>>, reason: String| {
            let (line, column) = match span {
                Some(s) => {
                    let (l, c) = line_col(src, s.start);
                    (Some(l), Some(c))
                }
                None => locate_key(src, &key),
            };
            ConfigError {
                file: file.to_string(),
                line,
                column,
                key,
                reason,
            }
        };
        if self.listeners.is_empty() {
            return Err(err(
                "listeners".into(),
                None,
                "at least one [[listeners]] is required".into(),
            ));
        }
        if let Some(p) = &self.server.upgrade_socket {
            // sockaddr_un holds 108 bytes, the terminating NUL included.
            if p.is_empty() || p.len() > MAX_UNIX_SOCKET_PATH || p.contains('\0') {
                return Err(err(
                    "server.upgrade_socket".into(),
                    None,
                    format!("must be a path of 1 to {MAX_UNIX_SOCKET_PATH} bytes without NUL"),
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            // An empty name would label the listener's metrics and log lines with nothing; an
            // unnamed listener is labelled by its address.
            if l.name.as_deref() == Some("") {
                return Err(err(
                    format!("listeners[{i}].name"),
                    None,
                    "must not be empty (leave `name` out to label the listener by its address)"
                        .into(),
                ));
            }
            if l.address.addr.port() != 0 && !seen.insert(l.address.addr) {
                return Err(err(
                    format!("listeners[{i}].address"),
                    None,
                    format!("{} is configured twice", l.address.addr),
                ));
            }
            if l.backlog == 0 {
                return Err(err(
                    format!("listeners[{i}].backlog"),
                    None,
                    "must be above 0".into(),
                ));
            }
            if let Some(t) = &l.tls {
                if l.redirect_https.is_some() {
                    return Err(err(
                        format!("listeners[{i}].redirect_https"),
                        None,
                        "a TLS listener does not redirect to https".into(),
                    ));
                }
                crate::tls::server_config(t, &format!("listeners[{i}].tls"))
                    .map_err(|e| err(e.key, None, e.reason))?;
            }
            if l.redirect_https.as_ref().and_then(|r| r.port) == Some(0) {
                return Err(err(
                    format!("listeners[{i}].redirect_https.port"),
                    None,
                    "must be above 0".into(),
                ));
            }
        }
        if self.routes.iter().any(|r| r.require_client_cert)
            && !self
                .listeners
                .iter()
                .any(|l| l.tls.as_ref().is_some_and(|t| t.client_auth.is_some()))
        {
            let i = self
                .routes
                .iter()
                .position(|r| r.require_client_cert)
                .unwrap_or(0);
            return Err(err(
                format!("routes[{i}].require_client_cert"),
                None,
                "no listener has tls.client_auth, so no request could pass".into(),
            ));
        }
        if self.rate_limiting.max_keys == 0 {
            return Err(err(
                "rate_limiting.max_keys".into(),
                None,
                "must be above 0".into(),
            ));
        }
        match (&self.rate_limiting.backend, &self.rate_limiting.redis) {
            (RateBackend::Redis, None) => {
                return Err(err(
                    "rate_limiting.redis".into(),
                    None,
                    "backend = \"redis\" needs a [rate_limiting.redis] table with an address"
                        .into(),
                ))
            }
            (_, Some(r)) if r.timeout.0.is_zero() => {
                return Err(err(
                    "rate_limiting.redis.timeout".into(),
                    None,
                    "must be above 0".into(),
                ))
            }
            _ => {}
        }
        let l = &self.limits;
        if l.max_headers == 0 || l.max_headers > MAX_HEADERS_CAP {
            return Err(err(
                "limits.max_headers".into(),
                None,
                format!("must be between 1 and {MAX_HEADERS_CAP}"),
            ));
        }
        if l.max_head_bytes.0 < 256 || l.max_head_bytes.0 > 1 << 20 {
            return Err(err(
                "limits.max_head_bytes".into(),
                None,
                "must be between 256 bytes and 1MiB".into(),
            ));
        }
        if l.max_uri_bytes.0 == 0 || l.max_uri_bytes.0 > l.max_head_bytes.0 {
            return Err(err(
                "limits.max_uri_bytes".into(),
                None,
                "must be above 0 and at most limits.max_head_bytes".into(),
            ));
        }
        for (name, u) in &self.upstreams {
            // `[upstreams.""]` is valid TOML; a group without a name cannot be told apart in
            // logs, metrics and the admin API.
            if name.is_empty() {
                return Err(err(
                    "upstreams.\"\"".into(),
                    None,
                    "an upstream group needs a name that is not empty".into(),
                ));
            }
            if u.endpoints.is_empty() {
                return Err(err(
                    format!("upstreams.{name}.endpoints"),
                    None,
                    "needs at least one endpoint".into(),
                ));
            }
            if let Some(hc) = &u.health_check {
                if !hc.path.starts_with('/') {
                    return Err(err(
                        format!("upstreams.{name}.health_check.path"),
                        None,
                        "must start with '/'".into(),
                    ));
                }
                if hc.interval.0 < MIN_HEALTH_CHECK_INTERVAL {
                    return Err(err(
                        format!("upstreams.{name}.health_check.interval"),
                        None,
                        format!(
                            "must be at least {}ms: a shorter one floods the endpoint with checks",
                            MIN_HEALTH_CHECK_INTERVAL.as_millis()
                        ),
                    ));
                }
                if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
                    return Err(err(
                        format!("upstreams.{name}.health_check"),
                        None,
                        "thresholds must be at least 1".into(),
                    ));
                }
                if hc
                    .expected_statuses
                    .iter()
                    .any(|s| !(100..=599).contains(s))
                {
                    return Err(err(
                        format!("upstreams.{name}.health_check.expected_statuses"),
                        None,
                        "statuses are 100..599".into(),
                    ));
                }
            }
            if u.outlier.max_ejection_percent > 100 {
                return Err(err(
                    format!("upstreams.{name}.outlier.max_ejection_percent"),
                    None,
                    "must be 0..100".into(),
                ));
            }
            if let Some(b) = &u.circuit_breaker {
                if let Some(r) = b.error_rate {
                    if !(r > 0.0 && r <= 1.0) {
                        return Err(err(
                            format!("upstreams.{name}.circuit_breaker.error_rate"),
                            None,
                            "must be in (0, 1]".into(),
                        ));
                    }
                }
                if b.half_open_probes == 0 {
                    return Err(err(
                        format!("upstreams.{name}.circuit_breaker.half_open_probes"),
                        None,
                        "must be at least 1".into(),
                    ));
                }
            }
            if u.hash_on.is_some() && u.balance != Balance::ConsistentHash {
                return Err(err(
                    format!("upstreams.{name}.hash_on"),
                    None,
                    "only used with balance = \"consistent_hash\"".into(),
                ));
            }
            if let Some(t) = &u.tls {
                crate::tls::client_config(t, &format!("upstreams.{name}.tls"))
                    .map_err(|e| err(e.key, None, e.reason))?;
            }
            for (j, e) in u.endpoints.iter().enumerate() {
                // Port 0 is "any port" to bind(2); a connect to it always fails, so every
                // request would get a 502.
                if e.address.addr.port() == 0 {
                    return Err(err(
                        format!("upstreams.{name}.endpoints[{j}].address"),
                        None,
                        format!(
                            "{:?}: port 0 is no port to connect to (every request would fail)",
                            e.address.text
                        ),
                    ));
                }
                if e.weight == 0 || e.weight > 1000 {
                    return Err(err(
                        format!("upstreams.{name}.endpoints[{j}].weight"),
                        None,
                        "must be between 1 and 1000".into(),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let k = |f: &str| format!("routes[{i}].{f}");
            if let Some(n) = &r.name {
                // An empty name would label the route's logs, metrics and rate-limit keys with
                // nothing; an unnamed route is `route#<its index>`.
                if n.is_empty() {
                    return Err(err(
                        k("name"),
                        None,
                        "must not be empty (leave `name` out for the default `route#N`)".into(),
                    ));
                }
                if !names.insert(n.clone()) {
                    return Err(err(
                        k("name"),
                        None,
                        format!("route name {n:?} is used twice"),
                    ));
                }
                // The metrics label requests that matched no route `(none)`: a route of that
                // name would share their series.
                if n == crate::metrics::UNMATCHED_ROUTE {
                    return Err(err(
                        k("name"),
                        None,
                        format!(
                            "route name {n:?} is the metrics label of requests that match no route"
                        ),
                    ));
                }
                // An unnamed route is `route#<its index>` (metrics, logs, rate-limit Redis
                // keys): a name of that form must be its own route's.
                if let Some(other) = n
                    .strip_prefix("route#")
                    .and_then(|d| d.parse::<usize>().ok())
                    .filter(|&o| o != i && format!("route#{o}") == *n)
                    .filter(|&o| self.routes.get(o).is_some_and(|r| r.name.is_none()))
                {
                    return Err(err(
                        k("name"),
                        None,
                        format!("route name {n:?} is the name of the unnamed routes[{other}]"),
                    ));
                }
            }
            if let Some(c) = &r.compose {
                if r.upstream.is_some() || r.direct.is_some() {
                    return Err(err(
                        k("compose"),
                        None,
                        "a route has one of `upstream`, `direct` and `compose`".into(),
                    ));
                }
                let group = |n: &str| self.upstreams.keys().position(|k| k == n);
                crate::compose::Plan::compile(c, r.path_regex.as_deref(), &group).map_err(|e| {
                    let span = crate::compose::config::locate(src, &e);
                    err(k(&format!("compose.{}", e.key)), span, e.reason)
                })?;
                // The auth stage's identity headers go with every call: a call's own copy
                // would be a second line, the first of which an upstream may read.
                let identity = crate::auth::WorkerAuth::identity_headers(self);
                for (ci, call) in c.calls.iter().enumerate() {
                    for (name, v) in &call.headers {
                        // `_` for `-` too, as CGI-style servers read it.
                        let n = name.0.to_ascii_lowercase().replace('_', "-");
                        if identity.iter().any(|h| h.as_ref() == n.as_bytes()) {
                            return Err(err(
                                k(&format!("compose.calls[{ci}].headers")),
                                Some(v.span()),
                                format!(
                                    "{n:?} is an identity header the gateway sets on every call from the auth stage"
                                ),
                            ));
                        }
                    }
                }
            }
            match (&r.upstream, &r.direct) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        k("direct"),
                        None,
                        "a route has either `upstream` or `direct`, not both".into(),
                    ))
                }
                (None, None) if r.compose.is_none() => {
                    return Err(err(
                        format!("routes[{i}]"),
                        None,
                        "a route needs `upstream`, `direct` or `compose`".into(),
                    ))
                }
                (Some(u), None) => {
                    if !self.upstreams.contains_key(u.get_ref()) {
                        return Err(err(
                            k("upstream"),
                            Some(u.span()),
                            format!(
                                "no upstream named {:?} (defined: {:?})",
                                u.get_ref(),
                                self.upstreams.keys().collect::<Vec<_>>()
                            ),
                        ));
                    }
                }
                (None, None) => {}
                (None, Some(d)) => {
                    if !(200..=599).contains(&d.status) {
                        return Err(err(
                            k("direct.status"),
                            None,
                            "must be between 200 and 599".into(),
                        ));
                    }
                }
            }
            let kinds = [
                r.path.is_some(),
                r.path_prefix.is_some(),
                r.path_regex.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if kinds > 1 {
                return Err(err(
                    k("path"),
                    None,
                    "use one of `path`, `path_prefix` and `path_regex`".into(),
                ));
            }
            if let Some(re) = &r.path_regex {
                regex::bytes::Regex::new(re)
                    .map_err(|e| err(k("path_regex"), None, format!("invalid regex: {e}")))?;
            }
            if r.replace_prefix.is_some() {
                if r.path_prefix.is_none() {
                    return Err(err(
                        k("replace_prefix"),
                        None,
                        "needs `path_prefix` (the part it replaces)".into(),
                    ));
                }
                if r.strip_prefix.is_some() {
                    return Err(err(
                        k("replace_prefix"),
                        None,
                        "use `strip_prefix` or `replace_prefix`, not both".into(),
                    ));
                }
            }
            for (j, h) in r.hosts.iter().enumerate() {
                let bare = h.strip_prefix("*.").unwrap_or(h);
                if bare.is_empty()
                    || bare.contains('*')
                    || bare.bytes().any(|b| b.is_ascii_whitespace() || b == b'/')
                {
                    return Err(err(
                        format!("routes[{i}].hosts[{j}]"),
                        None,
                        format!("{h:?} is not a host name or *.suffix wildcard"),
                    ));
                }
                let after_literal = match bare.strip_prefix('[') {
                    Some(rest) => rest.split_once(']').map_or("", |(_, after)| after),
                    None => bare,
                };
                if after_literal.contains(':') {
                    return Err(err(
                        format!("routes[{i}].hosts[{j}]"),
                        None,
                        format!("{h:?}: hosts are matched without the port; drop \":port\""),
                    ));
                }
                // A `*.` wildcard matches names under a DNS name. An address has none: no Host
                // can be `a.[::1]` (an IP-literal is the whole host, RFC 3986 §3.2.2), and a
                // host ending in an IPv4 address is no DNS name (a top-level label is never
                // all digits, RFC 3696 §2), so such a route could never match as meant.
                if h.starts_with("*.")
                    && (bare.starts_with('[')
                        || bare
                            .trim_end_matches('.')
                            .parse::<std::net::Ipv4Addr>()
                            .is_ok())
                {
                    return Err(err(
                        format!("routes[{i}].hosts[{j}]"),
                        None,
                        format!(
                            "{h:?}: an IP address has no names under it; a `*.` wildcard \
                             takes a DNS name (list the address itself to match it)"
                        ),
                    ));
                }
                // A Host header holds ASCII only (RFC 9110 §7.2, RFC 3986 §3.2.2): a name any
                // other way could never match.
                if !crate::http::valid_authority(bare.as_bytes()) {
                    return Err(err(
                        format!("routes[{i}].hosts[{j}]"),
                        None,
                        format!(
                            "{h:?} is not a host name a request can carry: letters, digits, \
                             -._~ or a [IPv6] literal (an internationalised name in its \
                             xn-- form, RFC 5890)"
                        ),
                    ));
                }
            }
            for (j, m) in r.methods.iter().enumerate() {
                if m.is_empty()
                    || !m
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
                {
                    return Err(err(
                        format!("routes[{i}].methods[{j}]"),
                        None,
                        format!("{m:?} is not an upper-case method name"),
                    ));
                }
            }
            if let Some(rt) = &r.retry {
                if rt.attempts == 0 || rt.attempts > 10 {
                    return Err(err(
                        k("retry.attempts"),
                        None,
                        "must be between 1 and 10".into(),
                    ));
                }
                for c in &rt.on {
                    if !RETRY_CONDITIONS.contains(&c.as_str()) {
                        return Err(err(
                            k("retry.on"),
                            None,
                            format!("unknown condition {c:?} (known: {RETRY_CONDITIONS:?})"),
                        ));
                    }
                }
                if rt.backoff_max.0 < rt.backoff_base.0 {
                    return Err(err(
                        k("retry.backoff_max"),
                        None,
                        "must be at least backoff_base".into(),
                    ));
                }
            }
            if r.concurrency.as_ref().is_some_and(|c| c.max == 0) {
                return Err(err(k("concurrency.max"), None, "must be above 0".into()));
            }
            if r.rate_limits.len() + r.quotas.len() > MAX_RATE_LIMITS_PER_ROUTE {
                return Err(err(
                    k("rate_limits"),
                    None,
                    format!("at most {MAX_RATE_LIMITS_PER_ROUTE} rate limits and quotas per route"),
                ));
            }
            for (j, q) in r.quotas.iter().enumerate() {
                if q.limit == 0 {
                    return Err(err(
                        format!("routes[{i}].quotas[{j}].limit"),
                        None,
                        "must be above 0".into(),
                    ));
                }
                if let Some(n) = &q.name {
                    if n.is_empty() || !n.bytes().all(is_tchar) {
                        return Err(err(
                            format!("routes[{i}].quotas[{j}].name"),
                            None,
                            format!("{n:?}: use letters, digits and -._ (it goes into RateLimit headers)"),
                        ));
                    }
                }
            }
            for (j, l) in r.rate_limits.iter().enumerate() {
                if let Some(n) = &l.name {
                    if n.is_empty() || !n.bytes().all(is_tchar) {
                        return Err(err(
                            format!("routes[{i}].rate_limits[{j}].name"),
                            None,
                            format!("{n:?}: use letters, digits and -._ (it goes into RateLimit headers)"),
                        ));
                    }
                }
                if l.rate == 0 {
                    return Err(err(
                        format!("routes[{i}].rate_limits[{j}].rate"),
                        None,
                        "must be above 0".into(),
                    ));
                }
                if l.burst == Some(0) {
                    return Err(err(
                        format!("routes[{i}].rate_limits[{j}].burst"),
                        None,
                        "must be above 0".into(),
                    ));
                }
            }
            // A limit's name tells it apart in the RateLimit headers and names its Redis keys
            // (`rl:<route>:<name>:...`): two limits of a route with one name would share
            // those keys, each with its own rate and burst.
            let limits: Vec<(Option<&String>, String)> = r
                .rate_limits
                .iter()
                .map(|l| (l.name.as_ref(), l.key.default_name()))
                .collect();
            let quotas: Vec<(Option<&String>, String)> = r
                .quotas
                .iter()
                .map(|q| {
                    let word = match q.period {
                        QuotaPeriod::Day => "day",
                        QuotaPeriod::Month => "month",
                    };
                    (q.name.as_ref(), word.to_string())
                })
                .collect();
            for (list, names) in [("rate_limits", limits), ("quotas", quotas)] {
                let mut seen = HashSet::new();
                for (j, (given, default)) in names.iter().enumerate() {
                    let name = given.unwrap_or(default);
                    if !seen.insert(name) {
                        return Err(err(
                            format!("routes[{i}].{list}[{j}]"),
                            None,
                            format!(
                                "the name {name:?} is {} another of the route's {list}: give \
                                 each its own `name` (it tells them apart in RateLimit headers \
                                 and names their Redis keys)",
                                if given.is_some() {
                                    "that of"
                                } else {
                                    "the default name (its key's or period's) of"
                                }
                            ),
                        ));
                    }
                }
            }
            let has_auth = r.auth.as_ref().is_some_and(|a| !a.any_of.is_empty());
            let keyed = r
                .rate_limits
                .iter()
                .enumerate()
                .map(|(j, l)| (format!("rate_limits[{j}].key"), &l.key))
                .chain(
                    r.quotas
                        .iter()
                        .enumerate()
                        .map(|(j, q)| (format!("quotas[{j}].key"), &q.key)),
                );
            for (name, key) in keyed {
                if key.needs_auth() && !has_auth {
                    return Err(err(
                        k(&name),
                        None,
                        "a consumer or claim key needs an auth policy on the route (`auth = ...`)"
                            .into(),
                    ));
                }
            }
        }
        if self
            .auth
            .realm
            .bytes()
            .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
        {
            return Err(err(
                "auth.realm".into(),
                None,
                "must not hold quotes, backslashes or control characters".into(),
            ));
        }
        crate::cache::config::validate(self).map_err(|(key, reason)| err(key, None, reason))?;
        // Before the auth checks, which read key files and resolve URLs.
        self.check_bounds_and_heads()
            .map_err(|(key, reason)| err(key, None, reason))?;
        let policies: Vec<_> = self.routes.iter().map(|r| r.auth.clone()).collect();
        crate::auth::config::validate(&self.auth, &self.consumers, &policies)
            .map_err(|(key, reason)| err(key, None, reason))?;
        if let Some(a) = &self.admin {
            crate::admin::config::validate(a).map_err(|(key, reason)| err(key, None, reason))?;
        }
        Ok(())
    }

    /// Bounds on counts and sizes, and every config string that ends up in a message head or a
    /// request target. Errors: (key path, reason). Durations are bounded by `Dur` itself.
    fn check_bounds_and_heads(&self) -> Result<(), (String, String)> {
        let fail = |key: String, reason: String| Err((key, reason));
        if self.server.workers > MAX_WORKERS {
            return fail(
                "server.workers".into(),
                format!("at most {MAX_WORKERS} (0: one per CPU)"),
            );
        }
        check_via(&self.server.via).map_err(|e| ("server.via".to_string(), e))?;
        if self.limits.max_body_bytes.0 > MAX_BODY_BYTES {
            return fail(
                "limits.max_body_bytes".into(),
                "at most 1TiB (1099511627776 bytes)".into(),
            );
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.backlog > MAX_BACKLOG {
                return fail(
                    format!("listeners[{i}].backlog"),
                    format!("at most {MAX_BACKLOG}"),
                );
            }
            let Some(t) = &l.tls else { continue };
            if t.session_cache > MAX_SESSION_CACHE {
                return fail(
                    format!("listeners[{i}].tls.session_cache"),
                    format!("at most {MAX_SESSION_CACHE} sessions"),
                );
            }
            if let Some(c) = &t.client_auth {
                check_identity_header(&c.subject_header.0)
                    .map_err(|e| (format!("listeners[{i}].tls.client_auth.subject_header"), e))?;
            }
        }
        for (name, u) in &self.upstreams {
            if matches!(u.max_idle, IdleCap::Fixed(n) if n > MAX_IDLE_PER_ENDPOINT) {
                return fail(
                    format!("upstreams.{name}.max_idle"),
                    format!("at most {MAX_IDLE_PER_ENDPOINT} connections per endpoint"),
                );
            }
            for (j, e) in u.endpoints.iter().enumerate() {
                // The address can become the Host of proxied requests (preserve_host = false)
                // and of health checks.
                check_host_value(&e.address.text)
                    .map_err(|r| (format!("upstreams.{name}.endpoints[{j}].address"), r))?;
            }
            if let Some(b) = &u.circuit_breaker {
                // Zero would make every request wait out its connect timeout, or refuse it.
                for (f, v) in [
                    ("max_connections", b.max_connections),
                    ("max_requests", b.max_requests),
                ] {
                    if v == Some(0) {
                        return fail(
                            format!("upstreams.{name}.circuit_breaker.{f}"),
                            "must be above 0 (0 would refuse every request; leave it out for no limit)".into(),
                        );
                    }
                }
            }
            if let Some(hc) = &u.health_check {
                check_origin_form(&hc.path)
                    .map_err(|r| (format!("upstreams.{name}.health_check.path"), r))?;
                if let Some(h) = &hc.host {
                    check_host_value(h)
                        .map_err(|r| (format!("upstreams.{name}.health_check.host"), r))?;
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let k = |f: &str| format!("routes[{i}].{f}");
            for (f, p) in [
                ("path", &r.path),
                ("path_prefix", &r.path_prefix),
                ("strip_prefix", &r.strip_prefix),
            ] {
                if let Some(p) = p {
                    check_target_path(p, false).map_err(|e| (k(f), e))?;
                }
            }
            if let Some(p) = &r.replace_prefix {
                check_target_path(p, true).map_err(|e| (k("replace_prefix"), e))?;
            }
            for (f, p) in [
                ("path", &r.path),
                ("path_prefix", &r.path_prefix),
                ("strip_prefix", &r.strip_prefix),
                ("replace_prefix", &r.replace_prefix),
            ] {
                if let Some(p) = p {
                    check_unambiguous(p, f).map_err(|e| (k(f), e))?;
                }
            }
            if let Some(h) = &r.set_host {
                check_host_value(h).map_err(|e| (k("set_host"), e))?;
            }
            for (f, ops) in [
                ("request_headers", &r.request_headers),
                ("response_headers", &r.response_headers),
            ] {
                for (op, names) in [
                    ("add", ops.add.keys().collect::<Vec<_>>()),
                    ("set", ops.set.keys().collect()),
                    ("remove", ops.remove.iter().collect()),
                ] {
                    for n in names {
                        check_not_gateway_owned(&n.0).map_err(|e| (k(&format!("{f}.{op}")), e))?;
                    }
                }
                for (op, m) in [("add", &ops.add), ("set", &ops.set)] {
                    for v in m.values() {
                        check_header_value(v).map_err(|e| (k(&format!("{f}.{op}")), e))?;
                    }
                }
            }
            if let Some(d) = &r.direct {
                for (n, v) in &d.headers {
                    check_not_gateway_owned(&n.0).map_err(|e| (k("direct.headers"), e))?;
                    check_header_value(v).map_err(|e| (k("direct.headers"), e))?;
                }
            }
            if r.max_body_bytes.is_some_and(|b| b.0 > MAX_BODY_BYTES) {
                return fail(
                    k("max_body_bytes"),
                    "at most 1TiB (1099511627776 bytes)".into(),
                );
            }
            if let Some(rt) = &r.retry {
                if rt.max_replay_bytes.0 > MAX_REPLAY_BYTES {
                    return fail(
                        k("retry.max_replay_bytes"),
                        "at most 16MiB (the body is held in memory for the replay)".into(),
                    );
                }
                if rt.budget_percent > MAX_RETRY_BUDGET_PERCENT {
                    return fail(
                        k("retry.budget_percent"),
                        format!("at most {MAX_RETRY_BUDGET_PERCENT}"),
                    );
                }
            }
        }
        if self.rate_limiting.max_keys > MAX_CACHE_ENTRIES {
            return fail(
                "rate_limiting.max_keys".into(),
                format!("at most {MAX_CACHE_ENTRIES}"),
            );
        }
        if let Some(r) = &self.rate_limiting.redis {
            let p = &r.key_prefix;
            if p.len() > MAX_KEY_PREFIX || !p.bytes().all(|b| b.is_ascii_graphic()) {
                return fail(
                    "rate_limiting.redis.key_prefix".into(),
                    format!("at most {MAX_KEY_PREFIX} visible ASCII characters, no spaces"),
                );
            }
        }
        let a = &self.auth;
        if a.cache_size > MAX_CACHE_ENTRIES {
            return fail(
                "auth.cache_size".into(),
                format!("at most {MAX_CACHE_ENTRIES}"),
            );
        }
        check_not_gateway_owned(&a.api_key.header.0)
            .map_err(|e| ("auth.api_key.header".to_string(), e))?;
        check_identity_header(&a.consumer_header.0)
            .map_err(|e| ("auth.consumer_header".to_string(), e))?;
        // Headers that say who the caller is by other means than a claim: a forwarded claim
        // (text the token's issuer, or its user, chose) must not be able to fill one.
        let mut identity: Vec<(&str, String)> = vec![
            ("authorization", "the credential header".into()),
            (&a.consumer_header.0, "auth.consumer_header".into()),
            (&a.api_key.header.0, "auth.api_key.header".into()),
        ];
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(c) = l.tls.as_ref().and_then(|t| t.client_auth.as_ref()) {
                identity.push((
                    &c.subject_header.0,
                    format!("listeners[{i}].tls.client_auth.subject_header"),
                ));
            }
        }
        let claim_header = |h: &str| -> Result<(), String> {
            check_identity_header(h)?;
            match identity.iter().find(|(n, _)| *n == h) {
                Some((_, what)) => Err(format!(
                    "{h:?} is {what}; a claim forwarded there would pass for that identity"
                )),
                None => Ok(()),
            }
        };
        for (name, j) in &a.jwt {
            if j.leeway_seconds > MAX_DURATION.as_secs() {
                return fail(
                    format!("auth.jwt.{name}.leeway_seconds"),
                    format!("at most {} (a day)", MAX_DURATION.as_secs()),
                );
            }
            for h in j.forward_claims.values() {
                claim_header(&h.0).map_err(|e| (format!("auth.jwt.{name}.forward_claims"), e))?;
            }
            if let Some(u) = &j.jwks_url {
                check_fetch_url(u).map_err(|e| (format!("auth.jwt.{name}.jwks_url"), e))?;
            }
        }
        for (name, i) in &a.introspection {
            if i.max_concurrent > MAX_INTROSPECTION_CONCURRENT {
                return fail(
                    format!("auth.introspection.{name}.max_concurrent"),
                    format!("at most {MAX_INTROSPECTION_CONCURRENT}"),
                );
            }
            for h in i.forward_claims.values() {
                claim_header(&h.0)
                    .map_err(|e| (format!("auth.introspection.{name}.forward_claims"), e))?;
            }
            check_fetch_url(&i.url).map_err(|e| (format!("auth.introspection.{name}.url"), e))?;
        }
        Ok(())
    }

    /// Workers to run: the config's, else one per available CPU.
    pub fn worker_count(&self) -> usize {
        if self.server.workers > 0 {
            self.server.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

/// A config file that is not UTF-8 (TOML 1.0 text is): the line and column of the first bad
/// byte, the key written on that line when there is one.
fn not_utf8(file: &str, e: std::string::FromUtf8Error) -> ConfigError {
    let at = e.utf8_error().valid_up_to();
    let bytes = e.as_bytes();
    let byte = bytes.get(at).copied().unwrap_or(0);
    // The text before the bad byte is valid: positions and the key come from it, and from the
    // rest of its line up to the next bad byte.
    let line_end = bytes[at..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(bytes.len(), |p| at + p);
    let text = String::from_utf8_lossy(&bytes[..line_end]);
    let (line, column) = line_col(&text, at);
    ConfigError {
        file: file.to_string(),
        line: Some(line),
        column: Some(column),
        key: key_at(&text, at),
        reason: format!("byte 0x{byte:02X} is not UTF-8 (a config file is UTF-8 text)"),
    }
}

/// Best-effort key path at `offset` of `src`, for errors that come with a position only: the
/// enclosing table header (`[server]`, the n-th `[[routes]]` as `routes[n]`) and the key
/// written before the nearest `=` on the line, left of `offset` (inside an inline table, the
/// inner key: `retry = { attempts = 1e99 }` gives `attempts`, joined to `retry`).
fn key_at(src: &str, offset: usize) -> String {
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map_or(0, |p| p + 1);
    let mut table = String::new();
    let mut arrays: Vec<(String, usize)> = Vec::new();
    for line in src[..line_start].lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = match arrays.iter_mut().find(|(a, _)| *a == name) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    arrays.push((name.clone(), 0));
                    0
                }
            };
            table = format!("{name}[{n}]");
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    let bare = |s: &str| {
        let s = s.trim();
        if let Some(q) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            return Some(q.to_string());
        }
        (!s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        .then(|| s.to_string())
    };
    // The keys in effect at the offset: `a = { b = 1, c = ` gives a, c (a `,` ends a sibling).
    let before = &src[line_start..offset];
    let mut keys: Vec<String> = Vec::new();
    let mut levels: Vec<usize> = Vec::new();
    let (mut token, mut quoted) = (0, false);
    for (i, c) in before.char_indices() {
        if quoted {
            quoted = c != '"';
            continue;
        }
        match c {
            // A quoted key is read whole, quotes included.
            '"' => {
                quoted = true;
                continue;
            }
            '=' => {
                if let Some(k) = bare(&before[token..i]) {
                    keys.push(k);
                }
            }
            '{' | '[' => levels.push(keys.len()),
            ',' => keys.truncate(levels.last().copied().unwrap_or(0)),
            '}' | ']' => {
                levels.pop();
            }
            _ => continue,
        }
        token = i + 1;
    }
    let mut parts: Vec<String> = Vec::new();
    if !table.is_empty() {
        parts.push(table);
    }
    parts.extend(keys);
    parts.join(".")
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|p| offset - p).unwrap_or(offset + 1);
    (line, col)
}

/// Best-effort position of a key path such as `routes[2].path_regex` for errors found after
/// deserialising: the line of the n-th `[[routes]]` table, then the first `name =` after it.
fn locate_key(src: &str, key: &str) -> (Option<usize>, Option<usize>) {
    let mut offset = 0usize;
    let parts: Vec<&str> = key.split('.').collect();
    let mut skip = 0;
    // A dotted table header such as `[auth.jwt.main]` covers several parts at once.
    for n in (2..=parts.len()).rev() {
        if parts[..n].iter().any(|p| p.contains('[')) {
            continue;
        }
        if let Some(p) = src.find(&format!("[{}]", parts[..n].join("."))) {
            offset = p;
            skip = n;
            break;
        }
    }
    for part in parts.into_iter().skip(skip) {
        let (name, idx) = match part.find('[') {
            Some(b) => (
                &part[..b],
                part[b + 1..part.len() - 1].parse::<usize>().ok(),
            ),
            None => (part, None),
        };
        let hay = &src[offset..];
        let found = match idx {
            Some(n) => {
                let header = format!("[[{name}]]");
                hay.match_indices(&header)
                    .nth(n)
                    .map(|(p, _)| p)
                    .or_else(|| find_key_line(hay, name))
            }
            None => find_key_line(hay, name),
        };
        match found {
            Some(p) => offset += p,
            // An inline table or array: the closest enclosing key found is the best position.
            None if offset > 0 => break,
            None => return (None, None),
        }
    }
    let (l, c) = line_col(src, offset);
    (Some(l), Some(c))
}

fn find_key_line(hay: &str, name: &str) -> Option<usize> {
    let mut pos = 0;
    for line in hay.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with(name) && t[name.len()..].trim_start().starts_with(['=', '.']) {
            return Some(pos + (line.len() - t.len()));
        }
        if t.trim_end() == format!("[{name}]").as_str() || t.starts_with(&format!("[{name}.")) {
            return Some(pos + (line.len() - t.len()));
        }
        pos += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
[[listeners]]
address = "127.0.0.1:0"

[upstreams.users]
endpoints = [{ address = "127.0.0.1:9001" }, { address = "localhost:9002", weight = 3 }]

[[routes]]
path_prefix = "/users"
upstream = "users"
"#;

    #[test]
    fn parses_minimal() {
        let c = Config::parse(OK, "t.toml").unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.upstreams["users"].endpoints[1].weight, 3);
        assert_eq!(c.timeouts.client_head.0, Duration::from_secs(10));
    }

    fn bad(src: &str) -> ConfigError {
        Config::parse(src, "bad.toml").unwrap_err()
    }

    #[test]
    fn unknown_key_is_refused_with_position() {
        let e = bad("[server]\nworkers = 2\nwrokers = 3\n");
        assert_eq!(e.file, "bad.toml");
        assert_eq!(e.line, Some(3));
        assert!(e.reason.contains("unknown field `wrokers`"), "{e}");
        assert_eq!(e.key, "server.wrokers");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = bad("[timeouts]\nclient_head = 5\n");
        assert_eq!(e.key, "timeouts.client_head");
        assert_eq!(e.line, Some(2));
        let e = bad("[timeouts]\nclient_head = \"5 parsecs\"\n");
        assert!(e.reason.contains("unit"), "{e}");
    }

    #[test]
    fn unknown_upstream_points_at_value() {
        let src = OK.replace("upstream = \"users\"", "upstream = \"nope\"");
        let e = bad(&src);
        assert_eq!(e.key, "routes[0].upstream");
        assert_eq!(e.line, Some(10));
        assert!(e.reason.contains("no upstream named \"nope\""), "{e}");
    }

    #[test]
    fn semantic_errors_locate_the_table() {
        let src = format!("{OK}\n[[routes]]\npath_regex = \"(\"\nupstream = \"users\"\n");
        let e = bad(&src);
        assert_eq!(e.key, "routes[1].path_regex");
        assert_eq!(e.line, Some(13));
        assert!(e.to_string().starts_with("bad.toml:13:"), "{e}");
    }

    #[test]
    fn refusals() {
        assert!(bad("").reason.contains("listeners"));
        let e = bad("[[listeners]]\naddress = \"nowhere\"\n");
        assert!(e.reason.contains("no port"), "{e}");
        let e = bad(&OK.replace("path_prefix = \"/users\"", "path_prefix = \"users\""));
        assert!(e.reason.contains("must start with"), "{e}");
        let e = bad(&format!("{OK}[limits]\nmax_headers = 1000\n"));
        assert_eq!(e.key, "limits.max_headers");
        let e = bad(&OK.replace("upstream = \"users\"", "upstream = \"users\"\nrate_limits = [{ name = \"a\\\"b\", key = \"route\", rate = 1 }]"));
        assert_eq!(e.key, "routes[0].rate_limits[0].name");
        let e = bad(&OK.replace(
            "upstream = \"users\"",
            "upstream = \"users\"\nrate_limits = [{ key = \"nobody\", rate = 1 }]",
        ));
        assert!(e.reason.contains("client_ip"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert!(parse_size("10XB").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
    }

    /// `OK` with `extra` appended, and the 1-based line `extra`'s first line lands on.
    fn with(extra: &str) -> (String, usize) {
        let line = OK.lines().count() + 1;
        (format!("{OK}{extra}"), line)
    }

    /// Asserts that `extra` is refused with `key` at `extra`'s line `line_in_extra` (0-based),
    /// the reason containing `why`.
    fn refused_at(extra: &str, line_in_extra: usize, key: &str, why: &str) {
        let (src, first) = with(extra);
        let e = bad(&src);
        assert_eq!(e.key, key, "{e}\n{src}");
        assert_eq!(e.line, Some(first + line_in_extra), "{e}\n{src}");
        assert_eq!(e.file, "bad.toml");
        assert!(e.reason.contains(why), "{e}");
        assert!(e.to_string().contains(&format!("key `{key}`")), "{e}");
    }

    /// An empty route or upstream name labels nothing in logs, metrics, the admin API and
    /// rate-limit keys: refused at load with the file, line, key and reason. Before, both loaded.
    #[test]
    fn empty_route_and_upstream_names_are_refused() {
        refused_at(
            "[[routes]]\nname = \"\"\npath = \"/a\"\nupstream = \"users\"\n",
            1,
            "routes[1].name",
            "must not be empty",
        );
        refused_at(
            "[upstreams.\"\"]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n",
            0,
            "upstreams.\"\"",
            "needs a name that is not empty",
        );
    }

    /// An empty listener name (metrics, log lines) or auth provider name (`[auth.jwt.""]`,
    /// `[auth.introspection.""]`: route policies, logs, metrics) labels nothing: refused at load
    /// with the file, line, key and reason, as empty route and upstream names are. Before, all
    /// three loaded.
    #[test]
    fn empty_listener_and_auth_provider_names_are_refused() {
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"\"\naddress = \"127.0.0.1:0\"\n");
        assert_eq!(
            (e.key.as_str(), e.line, e.file.as_str()),
            ("listeners[1].name", Some(5), "bad.toml"),
            "{e}"
        );
        assert!(e.reason.contains("must not be empty"), "{e}");
        refused_at(
            "[auth.jwt.\"\"]\nsecret = \"0123456789abcdef0123456789abcdef\"\nissuers = [\"i\"]\n",
            0,
            "auth.jwt.\"\"",
            "needs a name that is not empty",
        );
        refused_at(
            "[auth.introspection.\"\"]\nurl = \"http://127.0.0.1:9/introspect\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
            0,
            "auth.introspection.\"\"",
            "needs a name that is not empty",
        );
    }

    /// A 1 ms health-check interval is a thousand new connections a second to each endpoint:
    /// refused below 100 ms at load, with the file, line, key and reason. Before, it loaded.
    #[test]
    fn a_health_check_interval_below_the_floor_is_refused() {
        for (interval, line) in [("\"1ms\"", 2), ("\"99ms\"", 2)] {
            refused_at(
                &format!("[upstreams.b]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\nhealth_check = {{ interval = {interval} }}\n"),
                line,
                "upstreams.b.health_check.interval",
                "must be at least 100ms",
            );
        }
        refused_at(
            "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[upstreams.b.health_check]\npath = \"/\"\ninterval = \"10ms\"\n",
            4,
            "upstreams.b.health_check.interval",
            "must be at least 100ms",
        );
        let (src, _) = with(
            "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\nhealth_check = { interval = \"100ms\" }\n",
        );
        Config::parse(&src, "ok.toml").unwrap();
    }

    #[test]
    fn regression_huge_upstream_response_timeout_is_refused() {
        // Passed `ringway check` and aborted on the first proxied request (`Instant + d`).
        refused_at(
            "[timeouts]\nupstream_response = \"18000000000000000000s\"\n",
            1,
            "timeouts.upstream_response",
            "too long: at most 24h",
        );
    }

    #[test]
    fn durations_are_bounded_everywhere_with_key_and_line() {
        assert_eq!(parse_duration("24h").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("86400000ms").unwrap(), MAX_DURATION);
        for s in [
            "25h",
            "1441m",
            "86401s",
            "86400001ms",
            "18446744073709551615h",
            "99999999999999999999999s",
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains("at most 24h"), "{s}: {e}");
        }
        let cases: &[(&str, usize, &str)] = &[
            ("[server]\nshutdown_timeout = \"2000h\"\n", 1, "server.shutdown_timeout"),
            ("[timeouts]\nclient_idle = \"100000s\"\n", 1, "timeouts.client_idle"),
            (
                "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\ntimeouts = { upstream_response = \"90000s\" }\n",
                3,
                "routes[1].timeouts.upstream_response",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\nidle_timeout = \"48h\"\n",
                2,
                "upstreams.b.idle_timeout",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\nhealth_check = { interval = \"1000000m\" }\n",
                2,
                "upstreams.b.health_check.interval",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\noutlier = { max_ejection_time = \"30h\" }\n",
                2,
                "upstreams.b.outlier.max_ejection_time",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\ncircuit_breaker = { open_for = \"9999999999999999999s\" }\n",
                2,
                "upstreams.b.circuit_breaker.open_for",
            ),
            (
                "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\nretry = { backoff_max = \"25h\" }\n",
                3,
                "routes[1].retry.backoff_max",
            ),
            (
                "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\nrate_limits = [{ key = \"route\", rate = 1, per = \"100000s\" }]\n",
                3,
                "routes[1].rate_limits[0].per",
            ),
            (
                "[rate_limiting.redis]\naddress = \"127.0.0.1:6379\"\ntimeout = \"100000s\"\n",
                2,
                "rate_limiting.redis.timeout",
            ),
            ("[auth]\ncache_max_ttl = \"25h\"\n", 1, "auth.cache_max_ttl"),
            (
                "[auth.jwt.j]\nsecret = \"0123456789abcdef0123456789abcdef\"\njwks_grace = \"25h\"\n",
                2,
                "auth.jwt.j.jwks_grace",
            ),
        ];
        for (extra, line, key) in cases {
            refused_at(extra, *line, key, "at most 24h");
        }
    }

    #[test]
    fn sizes_and_counts_are_bounded() {
        let cases: &[(&str, usize, &str, &str)] = &[
            ("[limits]\nmax_body_bytes = 1099511627777\n", 1, "limits.max_body_bytes", "at most 1TiB"),
            (
                "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\nmax_body_bytes = \"2000GiB\"\n",
                3,
                "routes[1].max_body_bytes",
                "at most 1TiB",
            ),
            (
                "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\nretry = { max_replay_bytes = \"17MiB\" }\n",
                3,
                "routes[1].retry.max_replay_bytes",
                "at most 16MiB",
            ),
            (
                "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\nretry = { budget_percent = 5000 }\n",
                3,
                "routes[1].retry.budget_percent",
                "at most 1000",
            ),
            ("[server]\nworkers = 100000\n", 1, "server.workers", "at most 1024"),
            ("[rate_limiting]\nmax_keys = 100000000\n", 1, "rate_limiting.max_keys", "at most"),
            ("[auth]\ncache_size = 100000000\n", 1, "auth.cache_size", "at most"),
            (
                "[auth.jwt.j]\nsecret = \"0123456789abcdef0123456789abcdef\"\nleeway_seconds = 9223372036854775807\n",
                2,
                "auth.jwt.j.leeway_seconds",
                "at most 86400",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\nmax_idle = 1000000\n",
                2,
                "upstreams.b.max_idle",
                "at most 4096",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\ncircuit_breaker = { max_connections = 0 }\n",
                2,
                "upstreams.b.circuit_breaker.max_connections",
                "must be above 0",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\ncircuit_breaker = { max_requests = 0 }\n",
                2,
                "upstreams.b.circuit_breaker.max_requests",
                "must be above 0",
            ),
        ];
        for (extra, line, key, why) in cases {
            refused_at(extra, *line, key, why);
        }
        // A size that overflows u64 is refused while parsing, at its line.
        refused_at(
            "[limits]\nmax_body_bytes = \"18446744073709551615GiB\"\n",
            1,
            "limits.max_body_bytes",
            "too large",
        );
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:0\"\nbacklog = 4000000000\n");
        assert_eq!(e.key, "listeners[0].backlog");
        assert_eq!(e.line, Some(3));
    }

    /// Errors that TOML reports with a position but no path (a number beyond i64), values of
    /// `Spanned` fields, and bytes that are not UTF-8 still name the key (README: "errors
    /// naming file, line, column, key and reason"); before, no key, serde's private field
    /// name, or (not UTF-8) neither line nor key.
    #[test]
    fn every_error_names_its_key() {
        let big = "99999999999999999999999";
        refused_at(
            &format!("[server]\nworkers = {big}\n"),
            1,
            "server.workers",
            "too large",
        );
        let route = "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\n";
        refused_at(
            &format!("{route}max_body_bytes = {big}\n"),
            3,
            "routes[1].max_body_bytes",
            "too large",
        );
        refused_at(
            &format!("{route}retry = {{ on = [\"503\"], attempts = {big} }}\n"),
            3,
            "routes[1].retry.attempts",
            "too large",
        );
        let src = OK.replace("upstream = \"users\"", "upstream = 1");
        let e = bad(&src);
        assert_eq!(e.key, "routes[0].upstream", "{e}");
        assert!(e.reason.contains("invalid type"), "{e}");

        let dir = std::env::temp_dir().join(format!("ringway-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("latin1.toml");
        let mut bytes = OK.as_bytes().to_vec();
        bytes.extend_from_slice(b"name = \"caf\xe9\"\n");
        std::fs::write(&file, &bytes).unwrap();
        let e = Config::load(&file).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.line, Some(OK.lines().count() + 1), "{e}");
        assert_eq!(e.column, Some(12), "{e}");
        assert_eq!(e.key, "routes[0].name", "{e}");
        assert!(e.reason.contains("0xE9 is not UTF-8"), "{e}");
    }

    /// `key_at` reads any text at any offset without panicking (it sees files that failed to
    /// parse), and names the key written before the offset.
    #[test]
    fn key_at_reads_any_offset() {
        let src = "[a]\nx = { y = \"=,{[\", z = [1, { w = 2 }] }\n[[r]]\n\"q é\" = 1\n[[r]]\nk=\n";
        for (i, _) in src.char_indices().chain([(src.len(), ' ')]) {
            key_at(src, i);
        }
        let at = |needle: &str| key_at(src, src.find(needle).unwrap());
        assert_eq!(at("\"=,{["), "a.x.y");
        assert_eq!(at("1, {"), "a.x.z");
        assert_eq!(at("2 }"), "a.x.z.w");
        assert_eq!(at("1\n[[r]]\nk"), "r[0].q é");
        assert_eq!(key_at(src, src.len() - 1), "r[1].k");
    }

    #[test]
    fn regression_crlf_in_replace_prefix_is_refused() {
        // Was written into the upstream request head as is: a header injection.
        let src = OK.replace(
            "path_prefix = \"/users\"",
            "path_prefix = \"/users\"\nreplace_prefix = \"/v1\\r\\nX-Injected: 1\\r\\n\"",
        );
        let e = bad(&src);
        assert_eq!(e.key, "routes[0].replace_prefix");
        assert_eq!(e.line, Some(10));
        assert!(e.reason.contains("not allowed in a request path"), "{e}");
    }

    #[test]
    fn strings_reaching_heads_and_targets_are_validated() {
        let route = "[[routes]]\npath_prefix = \"/x\"\nupstream = \"users\"\n";
        let cases: Vec<(String, usize, &str, &str)> = vec![
            (format!("{route}replace_prefix = \"v2\"\n"), 3, "routes[1].replace_prefix", "must start with '/'"),
            (format!("{route}replace_prefix = \"/a b\"\n"), 3, "routes[1].replace_prefix", "not allowed"),
            (format!("{route}replace_prefix = \"/a?b=1\"\n"), 3, "routes[1].replace_prefix", "not allowed"),
            (format!("{route}replace_prefix = \"/a%zz\"\n"), 3, "routes[1].replace_prefix", "not allowed"),
            (format!("{route}strip_prefix = \"/x\\u0000\"\n"), 3, "routes[1].strip_prefix", "not allowed"),
            // RFC 3986 §5.2.4: a replacement with a dot segment makes a traversing target, and
            // a path or prefix with one (or an escaped unreserved character) matches no
            // request, since such requests get 400.
            (format!("{route}replace_prefix = \"/pub/..\"\n"), 3, "routes[1].replace_prefix", "dot segment"),
            (format!("{route}replace_prefix = \"/pub/.\"\n"), 3, "routes[1].replace_prefix", "dot segment"),
            (format!("{route}replace_prefix = \"/a/%2E%2e/b\"\n"), 3, "routes[1].replace_prefix", "dot segment"),
            (format!("{route}replace_prefix = \"/a/..;x/b\"\n"), 3, "routes[1].replace_prefix", "dot segment"),
            (format!("{route}strip_prefix = \"/x/../y\"\n"), 3, "routes[1].strip_prefix", "never match"),
            ("[[routes]]\npath = \"/a/./b\"\nupstream = \"users\"\n".into(), 1, "routes[1].path", "never match"),
            ("[[routes]]\npath_prefix = \"/%61dmin\"\nupstream = \"users\"\n".into(), 1, "routes[1].path_prefix", "never match"),
            (format!("{route}set_host = \"a.test\\r\\nx: y\"\n"), 3, "routes[1].set_host", "not a host"),
            (format!("{route}set_host = \"a.test/evil\"\n"), 3, "routes[1].set_host", "not a host"),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }, { address = \"localhost:0\" }]\n".into(),
                1,
                "upstreams.b.endpoints[1].address",
                "port 0",
            ),
            (
                "[[routes]]\nname = \"route#2\"\npath = \"/a\"\nupstream = \"users\"\n[[routes]]\nupstream = \"users\"\n".into(),
                1,
                "routes[1].name",
                "unnamed routes[2]",
            ),
            // Two limits of a route with one name (unnamed: their key's) would share their
            // Redis keys, each with its own rate.
            (
                format!("{route}rate_limits = [{{ key = \"client_ip\", rate = 10 }}, {{ key = \"client_ip\", rate = 600, per = \"1m\" }}]\n"),
                3,
                "routes[1].rate_limits[1]",
                "default name",
            ),
            (
                format!("{route}rate_limits = [{{ name = \"a\", key = \"client_ip\", rate = 1 }}, {{ name = \"a\", key = \"route\", rate = 2 }}]\n"),
                3,
                "routes[1].rate_limits[1]",
                "that of another",
            ),
            (
                format!("{route}quotas = [{{ key = \"client_ip\", limit = 10, period = \"day\" }}, {{ key = \"route\", limit = 99, period = \"day\" }}]\n"),
                3,
                "routes[1].quotas[1]",
                "default name",
            ),
            // A Host header is ASCII: this route could never match.
            (format!("{route}hosts = [\"caf\u{e9}.test\"]\n"), 3, "routes[1].hosts[0]", "xn--"),
            (format!("{route}hosts = [\"a.test\", \"*.b%41.test\"]\n"), 3, "routes[1].hosts[1]", "xn--"),
            (format!("{route}hosts = [\"[::1]:8080\"]\n"), 3, "routes[1].hosts[0]", "drop \":port\""),
            // A wildcard over an address can never match as meant.
            (format!("{route}hosts = [\"*.[::1]\"]\n"), 3, "routes[1].hosts[0]", "no names under it"),
            (format!("{route}hosts = [\"a.test\", \"*.127.0.0.1\"]\n"), 3, "routes[1].hosts[1]", "no names under it"),
            (format!("{route}hosts = [\"*.10.0.0.1.\"]\n"), 3, "routes[1].hosts[0]", "no names under it"),
            (format!("{route}replace_prefix = \"/pub%5C\"\n"), 3, "routes[1].replace_prefix", "%5C"),
            ("[[routes]]\npath_prefix = \"/a%5cb\"\nupstream = \"users\"\n".into(), 1, "routes[1].path_prefix", "%5C"),
            ("[[routes]]\npath = \"/a%00\"\nupstream = \"users\"\n".into(), 1, "routes[1].path", "%00"),
            (format!("{route}set_host = \"a.test:99999\"\n"), 3, "routes[1].set_host", "not a host"),
            (
                format!("{route}request_headers = {{ add = {{ \"x-a\" = \"1\\r\\nx-b: 2\" }} }}\n"),
                3,
                "routes[1].request_headers.add",
                "CR or LF",
            ),
            (
                format!("{route}request_headers = {{ set = {{ \"x-a\" = \"\\u0001\" }} }}\n"),
                3,
                "routes[1].request_headers.set",
                "control character",
            ),
            (
                format!("{route}response_headers = {{ add = {{ \"x-a\" = \" padded\" }} }}\n"),
                3,
                "routes[1].response_headers.add",
                "blank",
            ),
            (
                format!("{route}request_headers = {{ set = {{ \"transfer-encoding\" = \"chunked\" }} }}\n"),
                3,
                "routes[1].request_headers.set",
                "written by the gateway",
            ),
            (
                format!("{route}request_headers = {{ add = {{ \"Host\" = \"other\" }} }}\n"),
                3,
                "routes[1].request_headers.add",
                "written by the gateway",
            ),
            (
                format!("{route}response_headers = {{ remove = [\"content-length\"] }}\n"),
                3,
                "routes[1].response_headers.remove",
                "written by the gateway",
            ),
            (
                "[[routes]]\npath = \"/d\"\ndirect = { status = 200, headers = { \"content-length\" = \"5\" } }\n".into(),
                2,
                "routes[1].direct.headers",
                "written by the gateway",
            ),
            (
                "[[routes]]\npath = \"/d\"\ndirect = { status = 200, headers = { \"x-a\" = \"a\\nb\" } }\n".into(),
                2,
                "routes[1].direct.headers",
                "CR or LF",
            ),
            ("[server]\nvia = \"ring way\"\n".into(), 1, "server.via", "pseudonym"),
            ("[server]\nvia = \"rw\\r\\nx: y\"\n".into(), 1, "server.via", "pseudonym"),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\nhealth_check = { path = \"/h c\" }\n".into(),
                2,
                "upstreams.b.health_check.path",
                "not allowed",
            ),
            (
                "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\nhealth_check = { host = \"h\\r\\nx: y\" }\n".into(),
                2,
                "upstreams.b.health_check.host",
                "not a host",
            ),
            ("[auth]\nconsumer_header = \"x_consumer\"\n".into(), 1, "auth.consumer_header", "'_'"),
            ("[auth]\nconsumer_header = \"x-forwarded-for\"\n".into(), 1, "auth.consumer_header", "forwarding header"),
            ("[auth.api_key]\nheader = \"content-length\"\n".into(), 1, "auth.api_key.header", "written by the gateway"),
            (
                "[auth.jwt.j]\nsecret = \"0123456789abcdef0123456789abcdef\"\nforward_claims = { sub = \"x_user_id\" }\n".into(),
                2,
                "auth.jwt.j.forward_claims",
                "'_'",
            ),
            (
                "[auth.jwt.j]\njwks_url = \"http://127.0.0.1:9/keys a\"\n".into(),
                1,
                "auth.jwt.j.jwks_url",
                "not allowed",
            ),
            (
                "[auth.introspection.i]\nurl = \"http://127.0.0.1:9/in\\r\\nx: y\"\nclient_id = \"c\"\nclient_secret = \"s\"\n".into(),
                1,
                "auth.introspection.i.url",
                "not allowed",
            ),
            (
                "[rate_limiting.redis]\naddress = \"127.0.0.1:6379\"\nkey_prefix = \"rw \\r\\n\"\n".into(),
                2,
                "rate_limiting.redis.key_prefix",
                "visible ASCII",
            ),
        ];
        for (extra, line, key, why) in &cases {
            refused_at(extra, *line, key, why);
        }
        // What stays accepted.
        for extra in [
            format!("{route}replace_prefix = \"\"\n"),
            format!("{route}replace_prefix = \"/v1/%7Euser/a:b@c;d=e\"\n"),
            format!("{route}replace_prefix = \"/pub./a..b/.c\"\n"),
            "[[routes]]\npath_prefix = \"/files/.\"\nupstream = \"users\"\n".into(),
            format!("{route}set_host = \"[::1]:8080\"\n"),
            format!("{route}rate_limits = [{{ key = \"client_ip\", rate = 10 }}, {{ name = \"per-minute\", key = \"client_ip\", rate = 600, per = \"1m\" }}]\nquotas = [{{ key = \"client_ip\", limit = 10, period = \"day\" }}, {{ key = \"client_ip\", limit = 99, period = \"month\" }}]\n"),
            format!("{route}hosts = [\"[::1]\", \"*.a_b.test\", \"xn--caf-dma.test\", \"x.test.\"]\n"),
            format!("{route}set_host = \"users.internal\"\n"),
            format!("{route}request_headers = {{ add = {{ \"x-a\" = \"a\\tb c\" }}, set = {{ \"x-empty\" = \"\" }} }}\n"),
            "[server]\nvia = \"edge-1:8080\"\n".into(),
            "[upstreams.b]\nendpoints = [{ address = \"127.0.0.1:9\" }]\nhealth_check = { path = \"/h?full=1\", host = \"b.internal\" }\n".into(),
        ] {
            let (src, _) = with(&extra);
            Config::parse(&src, "ok.toml").unwrap_or_else(|e| panic!("{e}\n{src}"));
        }
    }

    #[test]
    fn trusted_proxies_parse_and_match() {
        use std::net::IpAddr;
        let (src, _) = with(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\", \"::1/128\", \"fd00::/8\", \"0.0.0.0/0\"]\n",
        );
        let c = Config::parse(&src, "t.toml").unwrap();
        let t = &c.server.trusted_proxies;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for yes in [
            "10.1.2.3",
            "127.0.0.1",
            "::1",
            "fd12::1",
            "::ffff:10.9.9.9",
            "203.0.113.9",
        ] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        let (src, _) = with("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n");
        let t = Config::parse(&src, "t.toml")
            .unwrap()
            .server
            .trusted_proxies;
        for yes in ["10.0.0.0", "10.255.255.255", "::ffff:10.1.1.1", "::1"] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in [
            "11.0.0.1",
            "9.255.255.255",
            "127.0.0.1",
            "::2",
            "fe80::1",
            "::ffff:11.0.0.1",
        ] {
            assert!(!t.contains(ip(no)), "{no}");
        }
        assert!(!Config::parse(OK, "t")
            .unwrap()
            .server
            .trusted_proxies
            .contains(ip("127.0.0.1")));
        // Bad entries: the key names the entry, the line is the array's.
        let cases = [
            ("\"10.0.0.0/33\"", "at most 32"),
            ("\"::/129\"", "at most 128"),
            ("\"10.0.0.1/8\"", "host bits"),
            ("\"10.0.0/8\"", "bad address"),
            ("\"10.0.0.0/\"", "prefix length"),
            ("\"10.0.0.0/+8\"", "prefix length"),
            ("\"localhost\"", "bad address"),
        ];
        for (entry, why) in cases {
            refused_at(
                &format!("[server]\ntrusted_proxies = [\"127.0.0.1\", {entry}]\n"),
                1,
                "server.trusted_proxies[1]",
                why,
            );
        }
    }

    /// Keys of issue 10's front-end conformance: listener parse switches, route trailers.
    #[test]
    fn conformance_keys() {
        let c = Config::parse(OK, "t.toml").unwrap();
        let l = c.listeners[0].request_limits(c.limits.to_limits());
        assert!(!l.allow_trace && !l.allow_underscores_in_headers);
        assert_eq!(c.routes[0].trailers, TrailersConfig::Drop);
        let src = OK
            .replace(
                "address = \"127.0.0.1:0\"",
                "address = \"127.0.0.1:0\"\nallow_trace = true\nallow_underscores_in_headers = true",
            )
            .replace("upstream = \"users\"", "upstream = \"users\"\ntrailers = \"forward\"");
        let c = Config::parse(&src, "t.toml").unwrap();
        let l = c.listeners[0].request_limits(c.limits.to_limits());
        assert!(l.allow_trace && l.allow_underscores_in_headers);
        assert_eq!(l.max_headers, c.limits.max_headers);
        assert_eq!(
            c.routes[0].trailers.policy(),
            crate::http::chunked::TrailerPolicy::Filter
        );
        let e = bad(&OK.replace(
            "upstream = \"users\"",
            "upstream = \"users\"\ntrailers = \"keep\"",
        ));
        assert_eq!(e.key, "routes[0].trailers");
        assert_eq!(e.line, Some(11));
        assert!(e.reason.contains("unknown variant"), "{e}");
        let e = bad(&OK.replace(
            "address = \"127.0.0.1:0\"",
            "address = \"127.0.0.1:0\"\nallow_trace = \"yes\"",
        ));
        assert_eq!(e.key, "listeners[0].allow_trace");
        assert_eq!(e.line, Some(4));
    }
}
