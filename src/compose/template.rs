//! Templates: `${...}` references over the client request and earlier calls, parsed once at
//! load and rendered per request.
//!
//! Grammar of a reference (inside `${` and `}`):
//!
//! ```text
//! request.path.<capture>      a named (or numbered) group of the route's `path_regex`
//!                             (percent-decoded, as a query value is)
//! request.query.<name>        the first query parameter of that name (percent-decoded)
//! request.header.<name>       the first header field of that name
//! request.consumer            the authenticated consumer's name
//! request.claims.<name>       a claim of the verified token
//! calls.<id>.status           an earlier call's status code
//! calls.<id>.header.<name>    a header field of an earlier call's answer
//! calls.<id>.body[<pointer>]  an earlier call's JSON, or a part of it (RFC 6901 pointer;
//!                             `body./a` is read as `body/a`)
//! item                        the current item of a `for_each` call (batch of 1)
//! ```
//!
//! `$$` writes one `$`. A value is written as text in a path, query or header (strings without
//! quotes, numbers and booleans as JSON writes them; null, an object or an array is a per-call
//! error there) and as JSON in a body. Text in a path or query is percent-encoded (RFC 3986
//! §2.1: all but the unreserved characters of §2.3), so no value can add a path segment, a
//! parameter or a fragment; a value that would make a `.` or `..` segment fails the call
//! (see `exec.rs`). Nor can a value take one away: an empty JSON string fails in a path or
//! query, and so does a reference in a path that writes nothing (a missing value, `exec.rs`),
//! or one in a query that does not read the client's own request.

use std::collections::HashMap;

use serde_json::Value;

/// Longest template accepted at load (bytes).
pub const MAX_TEMPLATE_BYTES: usize = 8 * 1024;

/// A capture of the route's `path_regex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    Name(String),
    Index(usize),
}

/// What a reference reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    PathCapture(Capture),
    Query(String),
    /// Lower-case name.
    Header(String),
    Consumer,
    Claim(String),
    /// Call index and JSON pointer ("" for the whole body).
    Body(usize, String),
    Status(usize),
    /// Call index and lower-case name.
    RespHeader(usize, String),
    Item,
}

impl Ref {
    /// The call this reference depends on, if any.
    pub fn call(&self) -> Option<usize> {
        match self {
            Ref::Body(c, _) | Ref::Status(c) | Ref::RespHeader(c, _) => Some(*c),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    Ref(Ref),
}

/// A parsed template.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

impl Template {
    /// Every reference, in order.
    pub fn refs(&self) -> impl Iterator<Item = &Ref> {
        self.parts.iter().filter_map(|p| match p {
            Part::Ref(r) => Some(r),
            Part::Lit(_) => None,
        })
    }

    /// The literal text with every reference written as `with`.
    pub fn literal_with(&self, with: &str) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => s.push_str(l),
                Part::Ref(_) => s.push_str(with),
            }
        }
        s
    }
}

/// Checks an RFC 6901 JSON pointer: empty, or `/`-separated tokens in which `~` is only
/// followed by `0` or `1` (§3). `*` tokens are wildcards only where `wildcard` allows (one).
pub fn check_pointer(p: &str, wildcard: bool) -> Result<(), String> {
    if p.is_empty() {
        return Ok(());
    }
    if !p.starts_with('/') {
        return Err(format!(
            "JSON pointer {p:?} must be empty or start with '/'"
        ));
    }
    let mut stars = 0;
    for tok in p[1..].split('/') {
        let b = tok.as_bytes();
        for (i, c) in b.iter().enumerate() {
            if *c == b'~' && !matches!(b.get(i + 1), Some(b'0') | Some(b'1')) {
                return Err(format!(
                    "JSON pointer {p:?}: '~' must be followed by 0 or 1 (RFC 6901 §3)"
                ));
            }
        }
        if tok == "*" {
            stars += 1;
        }
    }
    match (wildcard, stars) {
        (false, 0) | (true, 1) => Ok(()),
        (false, _) => Err(format!(
            "JSON pointer {p:?}: '*' is only allowed in `for_each.items`"
        )),
        (true, _) => Err(format!(
            "JSON pointer {p:?}: `for_each.items` needs exactly one '*' segment"
        )),
    }
}

/// What a template may refer to, for [`parse`].
pub struct Scope<'a> {
    /// Call ids and their indices.
    pub ids: &'a HashMap<&'a str, usize>,
    /// The route's `path_regex`, compiled (its capture names), if any.
    pub regex: Option<&'a regex::Regex>,
    /// `${item}` is allowed.
    pub item: bool,
    /// `*` is allowed in a body pointer (for `for_each.items` only).
    pub wildcard: bool,
}

/// Parses a template, resolving call ids to indices. Errors say what is wrong in words.
pub fn parse(src: &str, scope: &Scope<'_>) -> Result<Template, String> {
    if src.len() > MAX_TEMPLATE_BYTES {
        return Err(format!("longer than {MAX_TEMPLATE_BYTES} bytes"));
    }
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = src;
    while let Some(p) = rest.find('$') {
        lit.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        if let Some(a) = after.strip_prefix('$') {
            lit.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let end = a
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {src:?}"))?;
            let r = parse_ref(&a[..end], scope)?;
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
            }
            parts.push(Part::Ref(r));
            rest = &a[end + 1..];
        } else {
            lit.push('$');
            rest = after;
        }
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(Template { parts })
}

fn parse_ref(e: &str, scope: &Scope<'_>) -> Result<Ref, String> {
    let e = e.trim();
    if e == "item" {
        return if scope.item {
            Ok(Ref::Item)
        } else {
            Err("`${item}` is only allowed in a `for_each` call with `batch = 1`".into())
        };
    }
    let bad_name = |n: &str| n.is_empty() || n.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if let Some(r) = e.strip_prefix("request.") {
        if r == "consumer" {
            return Ok(Ref::Consumer);
        }
        let (kind, name) = r
            .split_once('.')
            .ok_or_else(|| format!("unknown reference `${{{e}}}`"))?;
        if bad_name(name) {
            return Err(format!("`${{{e}}}`: a name is missing or has spaces"));
        }
        return match kind {
            "path" => {
                let re = scope.regex.ok_or_else(|| {
                    format!("`${{{e}}}` needs a route with `path_regex` and that capture group")
                })?;
                let cap = match name.parse::<usize>() {
                    Ok(i) if i < re.captures_len() => Capture::Index(i),
                    Ok(i) => {
                        return Err(format!("`${{{e}}}`: path_regex has no capture group {i}"))
                    }
                    Err(_) if re.capture_names().flatten().any(|n| n == name) => {
                        Capture::Name(name.to_string())
                    }
                    Err(_) => {
                        return Err(format!(
                            "`${{{e}}}`: path_regex has no capture group named {name:?}"
                        ))
                    }
                };
                Ok(Ref::PathCapture(cap))
            }
            "query" => Ok(Ref::Query(name.to_string())),
            "header" => Ok(Ref::Header(name.to_ascii_lowercase())),
            "claims" => Ok(Ref::Claim(name.to_string())),
            _ => Err(format!("unknown reference `${{{e}}}`")),
        };
    }
    if let Some(r) = e.strip_prefix("calls.") {
        let (id, what) = match r.find(['.', '/']) {
            Some(p) => (&r[..p], &r[p..]),
            None => (r, ""),
        };
        let call = *scope
            .ids
            .get(id)
            .ok_or_else(|| format!("`${{{e}}}`: no call with id {id:?}"))?;
        let what = what.strip_prefix('.').unwrap_or(what);
        if what == "status" {
            return Ok(Ref::Status(call));
        }
        if let Some(h) = what.strip_prefix("header.") {
            if bad_name(h) {
                return Err(format!("`${{{e}}}`: a header name is missing"));
            }
            return Ok(Ref::RespHeader(call, h.to_ascii_lowercase()));
        }
        if let Some(p) = what.strip_prefix("body") {
            // `body./a` as the issue writes it, or `body/a`.
            let p = p.strip_prefix('.').unwrap_or(p);
            check_pointer(p, scope.wildcard)?;
            return Ok(Ref::Body(call, p.to_string()));
        }
        return Err(format!(
            "`${{{e}}}`: expected `status`, `header.<name>` or `body[/pointer]` after the call id"
        ));
    }
    Err(format!("unknown reference `${{{e}}}`"))
}

/// Where a rendered value goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ctx {
    /// Percent-encoded (path segment or query value).
    Url,
    /// Raw text, checked for control characters.
    Header,
    /// Raw bytes (a query value, percent-encoded as a whole afterwards).
    Raw,
    /// JSON text.
    Json,
}

/// A value a reference resolved to.
pub enum Val<'a> {
    /// Bytes from the client request (a capture, a parameter, a header).
    Bytes(std::borrow::Cow<'a, [u8]>),
    Json(std::borrow::Cow<'a, Value>),
    Missing,
}

/// Appends `v` to `out` as `ctx` requires. Errors are per-call reasons.
pub fn put_value(out: &mut Vec<u8>, v: Val<'_>, ctx: Ctx) -> Result<(), String> {
    match (v, ctx) {
        (Val::Missing, Ctx::Json) => out.extend_from_slice(b"null"),
        (Val::Missing, _) => {}
        (Val::Bytes(b), Ctx::Url) => percent_encode(out, &b),
        (Val::Bytes(b), Ctx::Header) => put_header_text(out, &b)?,
        (Val::Bytes(b), Ctx::Raw) => out.extend_from_slice(&b),
        (Val::Bytes(b), Ctx::Json) => {
            let s = String::from_utf8_lossy(&b);
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &*s);
        }
        (Val::Json(j), _) if holds_inexact(&j) => return Err(INEXACT.into()),
        (Val::Json(j), Ctx::Json) => {
            let _ = serde_json::to_writer(&mut *out, &*j);
        }
        // A null has no text: written as "" it would empty a parameter or a segment
        // (an empty filter, a collection URL), written as "null" it would be a value the
        // answer did not hold. The call fails, as for a missing pointer.
        (Val::Json(j), _) if j.is_null() => {
            return Err("a value is null, which cannot go in a path, query or header".into())
        }
        // An empty string from an answer, a claim or an item would empty a segment or a
        // parameter just the same (`?user_id=` is no filter to many APIs).
        (Val::Json(j), Ctx::Url | Ctx::Raw) if j.as_str() == Some("") => {
            return Err("a value is an empty string, which cannot go in a path or query".into())
        }
        (Val::Json(j), ctx) => {
            let text =
                scalar_text(&j).ok_or("an object or array cannot go in a path, query or header")?;
            match ctx {
                Ctx::Url => percent_encode(out, text.as_bytes()),
                Ctx::Raw => out.extend_from_slice(text.as_bytes()),
                _ => put_header_text(out, text.as_bytes())?,
            }
        }
    }
    Ok(())
}

/// Why a number in [`inexact`] cannot be passed on.
pub const INEXACT: &str = "a value is a whole number beyond 2^53 held as a double (an integer past 64 bits, or one with an exponent), which is not exact (RFC 8259 §6): passed on, it would be another number";

/// A number that serde_json holds as a double although it is a whole number beyond 2^53: an
/// integer literal beyond 64 bits (or one in exponent form). Written again it is another
/// number (`18446744073709551617` becomes `1.8446744073709552e19`), which would name another
/// resource, or make two ids one.
pub fn inexact(v: &Value) -> bool {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => n
            .as_f64()
            .is_some_and(|f| f.fract() == 0.0 && f.abs() >= EXACT),
        _ => false,
    }
}

/// Whether `v` is, or holds at any depth (a body template may pass a whole document on), a
/// number [`inexact`] says cannot be passed on. Iterative: answers nest at most 127 levels, but
/// no recursion is needed to know.
pub fn holds_inexact(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(o) => stack.extend(o.values()),
            v if inexact(v) => return true,
            _ => {}
        }
    }
    false
}

/// A scalar as text (strings unquoted, null empty); `None` for objects and arrays.
pub fn scalar_text(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) => Some(n.to_string().into()),
        Value::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
        Value::Null => Some("".into()),
        _ => None,
    }
}

/// RFC 9110 §5.5: a field value is visible characters, spaces and tabs.
fn put_header_text(out: &mut Vec<u8>, b: &[u8]) -> Result<(), String> {
    if b.iter().any(|c| (*c < 0x20 && *c != b'\t') || *c == 0x7f) {
        return Err("a header value would hold a control character".into());
    }
    out.extend_from_slice(b);
    Ok(())
}

/// Percent-encodes all but RFC 3986 §2.3's unreserved characters.
pub fn percent_encode(out: &mut Vec<u8>, b: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c);
        } else {
            out.extend_from_slice(&[b'%', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
        }
    }
}

/// Decodes `%XX` escapes (invalid ones are kept as they are).
pub fn percent_decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The first value of query parameter `name` in `query` (without the `?`), name and value
/// read as `application/x-www-form-urlencoded`, as upstream frameworks (and the API key
/// stage) read a query: each `+` a space, then `%XX` decoded. Passed on percent-encoded, a
/// `+` the client meant as a space would otherwise reach the upstream as a literal `+`.
pub fn query_param(query: &[u8], name: &str) -> Option<Vec<u8>> {
    query.split(|b| *b == b'&').find_map(|kv| {
        let (k, v) = match kv.iter().position(|b| *b == b'=') {
            Some(p) => (&kv[..p], &kv[p + 1..]),
            None => (kv, &b""[..]),
        };
        (crate::http::form_decoded(k) == name.as_bytes()).then(|| crate::http::form_decoded(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope<'a>(ids: &'a HashMap<&'a str, usize>, re: Option<&'a regex::Regex>) -> Scope<'a> {
        Scope {
            ids,
            regex: re,
            item: false,
            wildcard: false,
        }
    }

    #[test]
    fn parses_references_and_literals() {
        let ids: HashMap<&str, usize> = [("user", 0), ("orders", 1)].into_iter().collect();
        let re = regex::Regex::new("^/u/(?P<id>[0-9]+)$").unwrap();
        let t = parse(
            "/x/${request.path.id}/$${lit}/${calls.user.body./a~1b}${calls.orders.status}$",
            &scope(&ids, Some(&re)),
        )
        .unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Lit("/x/".into()),
                Part::Ref(Ref::PathCapture(Capture::Name("id".into()))),
                Part::Lit("/${lit}/".into()),
                Part::Ref(Ref::Body(0, "/a~1b".into())),
                Part::Ref(Ref::Status(1)),
                Part::Lit("$".into()),
            ]
        );
    }

    #[test]
    fn refusals_say_why() {
        let ids: HashMap<&str, usize> = [("user", 0)].into_iter().collect();
        let s = scope(&ids, None);
        for (src, why) in [
            ("${calls.nope.status}", "no call with id"),
            ("${calls.user.body/a~2}", "RFC 6901"),
            ("${calls.user.body/a/*}", "only allowed in `for_each.items`"),
            ("${request.path.id}", "needs a route with `path_regex`"),
            ("${item}", "only allowed in a `for_each`"),
            ("${request.bogus}", "unknown reference"),
            ("/a/${request.query.x", "unclosed"),
            ("${calls.user.bogus}", "expected `status`"),
        ] {
            let e = parse(src, &s).unwrap_err();
            assert!(e.contains(why), "{src}: {e}");
        }
    }

    #[test]
    fn values_are_encoded_for_where_they_go() {
        let mut out = Vec::new();
        put_value(
            &mut out,
            Val::Bytes(b"a/b c?&#".as_slice().into()),
            Ctx::Url,
        )
        .unwrap();
        assert_eq!(out, b"a%2Fb%20c%3F%26%23");
        out.clear();
        let v = serde_json::json!("x\"y");
        put_value(
            &mut out,
            Val::Json(std::borrow::Cow::Borrowed(&v)),
            Ctx::Json,
        )
        .unwrap();
        assert_eq!(out, br#""x\"y""#);
        out.clear();
        assert!(put_value(
            &mut out,
            Val::Bytes(b"a\r\nb".as_slice().into()),
            Ctx::Header
        )
        .is_err());
        let obj = serde_json::json!({"a": 1});
        assert!(put_value(
            &mut out,
            Val::Json(std::borrow::Cow::Borrowed(&obj)),
            Ctx::Url
        )
        .is_err());
        // A null has no text anywhere but a body; an empty string empties nothing in a URL.
        let null = serde_json::json!(null);
        let empty = serde_json::json!("");
        for ctx in [Ctx::Url, Ctx::Raw, Ctx::Header] {
            let e = put_value(&mut out, Val::Json(std::borrow::Cow::Borrowed(&null)), ctx);
            assert!(e.unwrap_err().contains("null"), "{ctx:?}");
        }
        for ctx in [Ctx::Url, Ctx::Raw] {
            let e = put_value(&mut out, Val::Json(std::borrow::Cow::Borrowed(&empty)), ctx);
            assert!(e.unwrap_err().contains("empty"), "{ctx:?}");
        }
        out.clear();
        put_value(
            &mut out,
            Val::Json(std::borrow::Cow::Borrowed(&null)),
            Ctx::Json,
        )
        .unwrap();
        assert_eq!(out, b"null");
        assert_eq!(query_param(b"a=1&b=x%20y&b=2", "b").unwrap(), b"x y");
        assert_eq!(
            query_param(b"q=two+words%2B1", "q").unwrap(),
            b"two words+1"
        );
        assert_eq!(query_param(b"my%5Fq=1", "my_q").unwrap(), b"1");
        assert_eq!(query_param(b"a", "a").unwrap(), b"");
        assert!(query_param(b"a=1", "c").is_none());
        assert_eq!(percent_decode(b"%4"), b"%4");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
    }
}
