//! The `compose` table of a route: typed with serde, validated at load, compiled into a
//! [`Plan`] per worker.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::config::{ByteSize, Dur, HeaderName};

use super::exec::MAX_JSON_DEPTH;
use super::template::{self, check_pointer, Ref, Scope, Template};

/// Most calls in one composition.
pub const MAX_CALLS: usize = 64;
/// Largest `max_items` of a `for_each`.
pub const MAX_FOR_EACH_ITEMS: usize = 10_000;
/// Largest `for_each.concurrency`.
pub const MAX_FOR_EACH_CONCURRENCY: usize = 256;
/// Largest `for_each.batch`.
pub const MAX_BATCH: usize = 1_000;
/// Largest `max_call_bytes`: 64 MiB.
pub const MAX_CALL_BYTES: u64 = 64 << 20;
/// Largest `max_total_bytes`: 256 MiB.
pub const MAX_TOTAL_BYTES: u64 = 256 << 20;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeConfig {
    /// The calls, in declared order (the order conflicts are settled in).
    pub calls: Vec<CallConfig>,
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// With `deep_merge`: arrays are concatenated (default) or the later replaces.
    #[serde(default)]
    pub arrays: Option<ArrayMerge>,
    /// The whole request's deadline: no call runs past it.
    #[serde(default = "d_deadline")]
    pub deadline: Dur,
    /// Failed optional calls are also listed in an `_errors` array of the answer.
    #[serde(default)]
    pub errors_field: bool,
    /// A failed required call that got an answer passes its status on (else 502 / 504).
    #[serde(default)]
    pub pass_status: bool,
    /// Largest body of one call's answer.
    #[serde(default = "d_call_bytes")]
    pub max_call_bytes: ByteSize,
    /// Largest sum of the bodies of one request's calls.
    #[serde(default = "d_total_bytes")]
    pub max_total_bytes: ByteSize,
}

fn d_deadline() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_call_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn d_total_bytes() -> ByteSize {
    ByteSize(8 << 20)
}
fn d_get() -> Spanned<String> {
    Spanned::new(0..0, "GET".into())
}
fn d_true() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// A key given by two calls fails the request (502 naming the key and the calls).
    #[default]
    Error,
    /// The call declared first keeps the key.
    First,
    /// The call declared last keeps the key.
    Last,
    /// Objects merge recursively; arrays per `arrays`; other values: the later declared.
    DeepMerge,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArrayMerge {
    #[default]
    Concat,
    Replace,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    pub id: Spanned<String>,
    pub upstream: Spanned<String>,
    #[serde(default = "d_get")]
    pub method: Spanned<String>,
    pub path: Spanned<String>,
    #[serde(default)]
    pub query: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub headers: BTreeMap<HeaderName, Spanned<String>>,
    /// JSON text with references written as JSON (only for the last step).
    #[serde(default)]
    pub body: Option<Spanned<String>>,
    /// This call's own limit (within the request's deadline).
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default = "d_true")]
    pub required: bool,
    /// The value used when this optional call fails.
    #[serde(default)]
    pub fallback: Option<toml::Value>,
    #[serde(default)]
    pub into: Option<String>,
    #[serde(default)]
    pub extract: Option<String>,
    #[serde(default)]
    pub pick: Vec<String>,
    #[serde(default)]
    pub omit: Vec<String>,
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub wrap: Option<String>,
    #[serde(default)]
    pub flatten: bool,
    #[serde(default)]
    pub for_each: Option<ForEachConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForEachConfig {
    /// `${calls.<id>.body/<array>/*/<id field>}`.
    pub items: Spanned<String>,
    #[serde(default = "d_max_items")]
    pub max_items: usize,
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    #[serde(default = "d_one")]
    pub batch: usize,
    #[serde(default)]
    pub batch_as: BatchAs,
    /// The query parameter that carries the ids (`repeat`, `comma`).
    #[serde(default)]
    pub batch_param: Option<String>,
    #[serde(default)]
    pub join: Option<JoinConfig>,
}
fn d_max_items() -> usize {
    100
}
fn d_concurrency() -> usize {
    8
}
fn d_one() -> usize {
    1
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BatchAs {
    /// `?id=1&id=2`
    #[default]
    Repeat,
    /// `?ids=1,2`
    Comma,
    /// A JSON array body `[1,2]` (POST).
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// The field of each result that holds the item's id.
    pub key: String,
    /// The field of each source item that receives its result.
    pub into: String,
}

// ---------------------------------------------------------------------------------------------
// Compiled form.

/// A composition, compiled.
#[derive(Debug)]
pub struct Plan {
    pub calls: Vec<Call>,
    pub on_conflict: OnConflict,
    pub arrays: ArrayMerge,
    pub deadline: Duration,
    pub errors_field: bool,
    pub pass_status: bool,
    pub max_call_bytes: usize,
    pub max_total_bytes: usize,
    /// Some template reads a call's answer header: answers keep their header fields.
    pub keep_headers: bool,
}

#[derive(Debug)]
pub struct Call {
    pub id: String,
    /// Upstream group index.
    pub group: usize,
    pub method: Box<str>,
    pub path: Template,
    pub query: Vec<(String, Template)>,
    /// Lower-case names.
    pub headers: Vec<(String, Template)>,
    pub body: Option<Template>,
    pub timeout: Option<Duration>,
    pub required: bool,
    pub fallback: Option<Value>,
    pub shape: Shape,
    pub for_each: Option<ForEach>,
    /// Calls whose results this one needs (its references and the `for_each` source).
    pub deps: Vec<usize>,
    /// The last step (a method other than GET or HEAD): it runs once every other call is
    /// done, and only when no required call failed.
    pub last: bool,
    /// Its answer is parsed into a JSON tree: something refers into it, shapes it or deep-merges
    /// it. Otherwise it is only validated and its bytes are spliced into the answer.
    pub tree: bool,
    /// How deep its answer may nest: [`MAX_JSON_DEPTH`] less the levels the composed answer
    /// places it under, so that the composed answer keeps to the limit answers are held to.
    pub max_depth: usize,
}

impl Call {
    pub fn safe(&self) -> bool {
        matches!(&*self.method, "GET" | "HEAD")
    }
}

#[derive(Debug, Default)]
pub struct Shape {
    pub into: Option<String>,
    pub extract: Option<String>,
    pub pick: Vec<String>,
    pub omit: Vec<String>,
    pub rename: Vec<(String, String)>,
    pub wrap: Option<String>,
    pub flatten: bool,
}

#[derive(Debug)]
pub struct ForEach {
    pub source: usize,
    /// Pointer to the array in the source's body.
    pub array: String,
    /// Pointer to the id within each element ("" for the element itself).
    pub id: String,
    pub max_items: usize,
    pub concurrency: usize,
    pub batch: usize,
    pub batch_as: BatchAs,
    pub batch_param: Option<String>,
    pub join: Option<JoinConfig>,
}

/// A validation error: the key below `routes[i].compose`, the place in the file when known
/// (a span, and a field name to look for after it), and the reason.
#[derive(Debug)]
pub struct ComposeError {
    pub key: String,
    pub span: Option<Range<usize>>,
    pub field: Option<&'static str>,
    pub reason: String,
}

/// Header fields a call may not set: the framing and connection fields are the gateway's
/// (RFC 9112 §6, RFC 9110 §7.6.1), Host is the endpoint's, and the request id and trace
/// context go with every call from the client request (W3C Trace Context §3): a call's own
/// would be a second field line of a field that has one value (RFC 9110 §5.3).
const OWNED_HEADERS: &[&str] = &[
    "host",
    "x-request-id",
    "traceparent",
    "tracestate",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// A query parameter name the gateway writes as it is: RFC 3986 §2.3's unreserved characters.
fn query_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

impl Plan {
    /// Validates and compiles. `regex`: the route's `path_regex`; `upstream`: a group name to
    /// its index (None: no such group).
    pub fn compile(
        c: &ComposeConfig,
        regex: Option<&str>,
        upstream: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Plan, ComposeError> {
        let fail = |key: String, span: Option<Range<usize>>, field, reason: String| ComposeError {
            key,
            span,
            field,
            reason,
        };
        if c.calls.is_empty() || c.calls.len() > MAX_CALLS {
            return Err(fail(
                "calls".into(),
                None,
                None,
                format!("between 1 and {MAX_CALLS} calls"),
            ));
        }
        if c.arrays.is_some() && c.on_conflict != OnConflict::DeepMerge {
            return Err(fail(
                "arrays".into(),
                None,
                None,
                "only used with on_conflict = \"deep_merge\"".into(),
            ));
        }
        if c.max_call_bytes.0 == 0 || c.max_call_bytes.0 > MAX_CALL_BYTES {
            return Err(fail(
                "max_call_bytes".into(),
                None,
                None,
                "between 1 byte and 64MiB".into(),
            ));
        }
        if c.max_total_bytes.0 == 0 || c.max_total_bytes.0 > MAX_TOTAL_BYTES {
            return Err(fail(
                "max_total_bytes".into(),
                None,
                None,
                "between 1 byte and 256MiB".into(),
            ));
        }
        let re = regex.and_then(|r| regex::Regex::new(r).ok());
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (i, call) in c.calls.iter().enumerate() {
            let id = call.id.get_ref().as_str();
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(fail(
                    format!("calls[{i}].id"),
                    Some(call.id.span()),
                    None,
                    "1 to 64 letters, digits, '_' or '-'".into(),
                ));
            }
            if ids.insert(id, i).is_some() {
                return Err(fail(
                    format!("calls[{i}].id"),
                    Some(call.id.span()),
                    None,
                    format!("call id {id:?} is used twice"),
                ));
            }
        }
        let mut calls = Vec::with_capacity(c.calls.len());
        let mut last_steps = Vec::new();
        for (i, cc) in c.calls.iter().enumerate() {
            let k = |f: &str| format!("calls[{i}].{f}");
            let at = Some(cc.id.span());
            let group = upstream(cc.upstream.get_ref()).ok_or_else(|| {
                fail(
                    k("upstream"),
                    Some(cc.upstream.span()),
                    None,
                    format!("no upstream named {:?}", cc.upstream.get_ref()),
                )
            })?;
            let method = cc.method.get_ref().to_ascii_uppercase();
            let mspan = Some(cc.method.span())
                .filter(|s| !s.is_empty())
                .or(at.clone());
            if !METHODS.contains(&method.as_str()) {
                return Err(fail(
                    k("method"),
                    mspan,
                    Some("method"),
                    format!("one of {METHODS:?}"),
                ));
            }
            let safe = matches!(method.as_str(), "GET" | "HEAD");
            let fe = cc.for_each.as_ref();
            let item = fe.is_some_and(|f| f.batch == 1);
            let scope = Scope {
                ids: &ids,
                regex: re.as_ref(),
                item,
                wildcard: false,
            };
            let tpl = |s: &Spanned<String>, key: String| {
                template::parse(s.get_ref(), &scope).map_err(|e| fail(key, Some(s.span()), None, e))
            };
            let path = tpl(&cc.path, k("path"))?;
            let lit = path.literal_with("x");
            if !lit.starts_with('/')
                || lit
                    .bytes()
                    .any(|b| !b.is_ascii_graphic() || b == b'#' || b == b'?')
                // A dot-segment (RFC 3986 §3.3) leads elsewhere; values are refused per call.
                || lit.split('/').any(|seg| seg == "." || seg == "..")
            {
                return Err(fail(
                    k("path"),
                    Some(cc.path.span()),
                    None,
                    "must start with '/' and hold visible ASCII only, no '?' or '#' (use `query`), no '.' or '..' segment"
                        .into(),
                ));
            }
            let mut query = Vec::new();
            for (name, v) in &cc.query {
                if !query_name(name) {
                    return Err(fail(
                        k("query"),
                        Some(v.span()),
                        None,
                        format!(
                            "parameter name {name:?}: letters, digits, '-', '.', '_', '~' only"
                        ),
                    ));
                }
                query.push((name.clone(), tpl(v, k(&format!("query.{name}")))?));
            }
            let mut headers = Vec::new();
            for (name, v) in &cc.headers {
                let n = name.0.to_ascii_lowercase();
                // CGI-style servers read `_` as `-`: `content_length` is Content-Length to them
                // (see `listeners[].allow_underscores_in_headers`).
                if OWNED_HEADERS.contains(&n.replace('_', "-").as_str()) {
                    return Err(fail(
                        k("headers"),
                        Some(v.span()),
                        None,
                        format!("{n:?} is set by the gateway"),
                    ));
                }
                let t = tpl(v, k(&format!("headers.{}", name.0)))?;
                if t.literal_with("")
                    .bytes()
                    .any(|b| b.is_ascii_control() && b != b'\t')
                {
                    return Err(fail(
                        k("headers"),
                        Some(v.span()),
                        None,
                        "a header value may not hold control characters".into(),
                    ));
                }
                headers.push((n, t));
            }
            let body = match &cc.body {
                None => None,
                Some(b) => {
                    if safe {
                        return Err(fail(
                            k("body"),
                            Some(b.span()),
                            None,
                            "a body is only sent by the last step (a POST, PUT, PATCH or DELETE call)"
                                .into(),
                        ));
                    }
                    let t = tpl(b, k("body"))?;
                    if let Err(e) = serde_json::from_str::<Value>(&t.literal_with("null")) {
                        return Err(fail(
                            k("body"),
                            Some(b.span()),
                            None,
                            format!("not JSON once references are filled in: {e}"),
                        ));
                    }
                    // A reference is written as a whole JSON value, a string with its quotes:
                    // inside a string of the template (`"id-${...}"`) it would make the body
                    // invalid JSON for every request. With `""` for each reference such a
                    // template does not parse, where `null` left it a string.
                    if serde_json::from_str::<Value>(&t.literal_with("\"\"")).is_err() {
                        return Err(fail(
                            k("body"),
                            Some(b.span()),
                            None,
                            "a reference inside a JSON string: a reference is written as a whole JSON value (a string with its quotes); write it alone, as in `{\"id\": ${calls.a.body/id}}`"
                                .into(),
                        ));
                    }
                    Some(t)
                }
            };
            let fallback = match &cc.fallback {
                None => None,
                Some(_) if cc.required => {
                    return Err(fail(
                        k("fallback"),
                        at.clone(),
                        Some("fallback"),
                        "only an optional call (required = false) has a fallback".into(),
                    ))
                }
                Some(v) => Some(serde_json::to_value(v).map_err(|e| {
                    fail(k("fallback"), at.clone(), Some("fallback"), e.to_string())
                })?),
            };
            for (f, p) in [("extract", &cc.extract)] {
                if let Some(p) = p {
                    check_pointer(p, false)
                        .map_err(|e| fail(k(f), at.clone(), Some("extract"), e))?;
                }
            }
            for (f, v) in [("into", &cc.into), ("wrap", &cc.wrap)] {
                if v.as_ref().is_some_and(|s| s.is_empty()) {
                    return Err(fail(
                        k(f),
                        at.clone(),
                        Some(if f == "into" { "into" } else { "wrap" }),
                        "must not be empty".into(),
                    ));
                }
            }
            // The gateway's list of failed calls owns `_errors` at the top level.
            let top = match (&cc.into, &cc.wrap) {
                (Some(k), _) | (None, Some(k)) => k == super::exec::ERRORS_FIELD,
                (None, None) => fallback
                    .as_ref()
                    .is_some_and(|f| f.get(super::exec::ERRORS_FIELD).is_some()),
            };
            if c.errors_field && top {
                let f = match (&cc.into, &cc.wrap) {
                    (Some(_), _) => "into",
                    (None, Some(_)) => "wrap",
                    (None, None) => "fallback",
                };
                return Err(fail(
                    k(f),
                    at.clone(),
                    Some(f),
                    "\"_errors\" is where errors_field lists the failed calls".into(),
                ));
            }
            let mut deps: Vec<usize> = Vec::new();
            let mut add_deps = |t: &Template| {
                for r in t.refs() {
                    if let Some(d) = r.call() {
                        if !deps.contains(&d) {
                            deps.push(d);
                        }
                    }
                }
            };
            add_deps(&path);
            query.iter().for_each(|(_, t)| add_deps(t));
            headers.iter().for_each(|(_, t)| add_deps(t));
            if let Some(b) = &body {
                add_deps(b);
            }
            let for_each = match fe {
                None => None,
                Some(f) => {
                    let items = template::parse(
                        f.items.get_ref(),
                        &Scope {
                            ids: &ids,
                            regex: None,
                            item: false,
                            wildcard: true,
                        },
                    )
                    .map_err(|e| fail(k("for_each.items"), Some(f.items.span()), None, e))?;
                    let (source, ptr) =
                        match items.parts.as_slice() {
                            [template::Part::Ref(Ref::Body(s, p))] => (*s, p.clone()),
                            _ => return Err(fail(
                                k("for_each.items"),
                                Some(f.items.span()),
                                None,
                                "must be one reference `${calls.<id>.body/<array>/*[/<field>]}`"
                                    .into(),
                            )),
                        };
                    let star = ptr.find("/*").unwrap_or(0);
                    let (array, id) = (ptr[..star].to_string(), ptr[star + 2..].to_string());
                    let fk = |f: &str| k(&format!("for_each.{f}"));
                    let bound = |name: &'static str, v: usize, max: usize| {
                        if v == 0 || v > max {
                            Err(fail(
                                fk(name),
                                at.clone(),
                                Some(name),
                                format!("between 1 and {max}"),
                            ))
                        } else {
                            Ok(())
                        }
                    };
                    bound("max_items", f.max_items, MAX_FOR_EACH_ITEMS)?;
                    bound("concurrency", f.concurrency, MAX_FOR_EACH_CONCURRENCY)?;
                    bound("batch", f.batch, MAX_BATCH)?;
                    // Written into every batch's request target as it is (RFC 3986 §3.4):
                    // the same characters as a `query` parameter's name.
                    if let Some(p) = f.batch_param.as_ref().filter(|p| !query_name(p)) {
                        return Err(fail(
                            fk("batch_param"),
                            // Within the `for_each` table, where `items` is.
                            Some(f.items.span()),
                            Some("batch_param"),
                            format!(
                                "parameter name {p:?}: letters, digits, '-', '.', '_', '~' only"
                            ),
                        ));
                    }
                    match (f.batch_as, &f.batch_param) {
                        (BatchAs::Json, Some(_)) => {
                            return Err(fail(
                                fk("batch_param"),
                                at.clone(),
                                Some("batch_param"),
                                "not used with batch_as = \"json\" (the ids are the body)".into(),
                            ))
                        }
                        (BatchAs::Json, None) if safe || cc.body.is_some() => {
                            return Err(fail(
                                fk("batch_as"),
                                at.clone(),
                                Some("batch_as"),
                                "batch_as = \"json\" sends the ids as the body: the call needs a method with a body (POST) and no `body` of its own"
                                    .into(),
                            ))
                        }
                        (BatchAs::Repeat | BatchAs::Comma, None) if f.batch > 1 => {
                            return Err(fail(
                                fk("batch_param"),
                                at.clone(),
                                Some("batch_param"),
                                "a batch of more than one id needs the query parameter that carries them"
                                    .into(),
                            ))
                        }
                        _ => {}
                    }
                    if let Some(j) = &f.join {
                        if id.is_empty() {
                            return Err(fail(
                                fk("join"),
                                at.clone(),
                                Some("join"),
                                "a join needs items that are objects: `.../*/<id field>`".into(),
                            ));
                        }
                        if j.key.is_empty() || j.into.is_empty() {
                            return Err(fail(
                                fk("join"),
                                at.clone(),
                                Some("join"),
                                "`key` and `into` must not be empty".into(),
                            ));
                        }
                        if cc.into.is_some() || cc.wrap.is_some() || cc.fallback.is_some() {
                            return Err(fail(
                                fk("join"),
                                at.clone(),
                                Some("join"),
                                "a joined call puts its results into the source's items: no `into`, `wrap` or `fallback`"
                                    .into(),
                            ));
                        }
                    }
                    if !deps.contains(&source) {
                        deps.push(source);
                    }
                    Some(ForEach {
                        source,
                        array,
                        id,
                        max_items: f.max_items,
                        concurrency: f.concurrency,
                        batch: f.batch,
                        batch_as: f.batch_as,
                        batch_param: f.batch_param.clone(),
                        join: f.join.clone(),
                    })
                }
            };
            if !safe {
                last_steps.push(i);
            }
            calls.push(Call {
                id: cc.id.get_ref().clone(),
                group,
                method: method.into(),
                path,
                query,
                headers,
                body,
                timeout: cc.timeout.map(|d| d.0),
                required: cc.required,
                fallback,
                shape: Shape {
                    into: cc.into.clone(),
                    extract: cc.extract.clone(),
                    pick: cc.pick.clone(),
                    omit: cc.omit.clone(),
                    rename: cc
                        .rename
                        .iter()
                        .map(|(a, b)| (a.clone(), b.clone()))
                        .collect(),
                    wrap: cc.wrap.clone(),
                    flatten: cc.flatten,
                },
                for_each,
                deps,
                last: false,
                tree: false,
                max_depth: MAX_JSON_DEPTH,
            });
        }
        // A call with side effects is the last step: nothing may depend on it, there is at
        // most one, and it runs once every other call is done.
        if last_steps.len() > 1 {
            let i = last_steps[1];
            return Err(fail(
                format!("calls[{i}].method"),
                Some(c.calls[i].method.span()).filter(|s| !s.is_empty()),
                None,
                format!(
                    "only one call may use a method other than GET or HEAD (the last step); {:?} already does",
                    calls[last_steps[0]].id
                ),
            ));
        }
        for (i, call) in calls.iter().enumerate() {
            if let Some(d) = call.deps.iter().find(|d| last_steps.contains(d)) {
                return Err(fail(
                    format!("calls[{i}]"),
                    Some(c.calls[i].id.span()),
                    None,
                    format!(
                        "depends on {:?}, which uses {}: a call with a method other than GET or HEAD must be the last step",
                        calls[*d].id, calls[*d].method
                    ),
                ));
            }
        }
        if let Some(cycle) = find_cycle(&calls) {
            let names: Vec<&str> = cycle.iter().map(|i| calls[*i].id.as_str()).collect();
            return Err(fail(
                format!("calls[{}]", cycle[0]),
                Some(c.calls[cycle[0]].id.span()),
                None,
                format!(
                    "calls depend on each other in a cycle: {}",
                    names.join(" -> ")
                ),
            ));
        }
        if let Some(&l) = last_steps.first() {
            calls[l].last = true;
        }
        let mut keep_headers = false;
        let mut tree = vec![c.on_conflict == OnConflict::DeepMerge; calls.len()];
        for (i, call) in calls.iter().enumerate() {
            let s = &call.shape;
            tree[i] |= call.for_each.is_some()
                || s.extract.is_some()
                || !s.pick.is_empty()
                || !s.omit.is_empty()
                || !s.rename.is_empty()
                || s.wrap.is_some()
                || s.flatten;
            if let Some(fe) = &call.for_each {
                tree[fe.source] = true;
            }
            let templates = std::iter::once(&call.path)
                .chain(call.query.iter().map(|(_, t)| t))
                .chain(call.headers.iter().map(|(_, t)| t))
                .chain(call.body.iter());
            for r in templates.flat_map(|t| t.refs()) {
                match r {
                    Ref::Body(d, _) => tree[*d] = true,
                    Ref::RespHeader(..) => keep_headers = true,
                    _ => {}
                }
            }
        }
        for (call, t) in calls.iter_mut().zip(tree) {
            call.tree = t;
        }
        // The composed answer is JSON a client parses, held to the limit the answers are: the
        // root object (under `into`), `wrap`, a `for_each`'s array of results, and for a join
        // the source's own levels, the pointer to its array, the array and the item, are
        // taken off what an answer may nest (`extract` and `flatten` are not counted back).
        let placed = |s: &Shape| usize::from(s.into.is_some()) + usize::from(s.wrap.is_some());
        let under: Vec<usize> = calls
            .iter()
            .map(|call| match &call.for_each {
                Some(fe) if fe.join.is_some() => {
                    placed(&calls[fe.source].shape) + fe.array.matches('/').count() + 2
                }
                Some(_) => placed(&call.shape) + 1,
                None => placed(&call.shape),
            })
            .collect();
        for (call, u) in calls.iter_mut().zip(under) {
            call.max_depth = MAX_JSON_DEPTH.saturating_sub(u);
        }
        Ok(Plan {
            calls,
            on_conflict: c.on_conflict,
            arrays: c.arrays.unwrap_or_default(),
            deadline: c.deadline.0,
            errors_field: c.errors_field,
            pass_status: c.pass_status,
            max_call_bytes: c.max_call_bytes.0 as usize,
            max_total_bytes: c.max_total_bytes.0 as usize,
            keep_headers,
        })
    }
}

/// A dependency cycle (its calls in order, the first repeated at the end), if any.
fn find_cycle(calls: &[Call]) -> Option<Vec<usize>> {
    // 0: unseen, 1: on the stack, 2: done. Iterative DFS (a hostile config cannot blow the
    // stack; calls are bounded anyway).
    let mut state = vec![0u8; calls.len()];
    for start in 0..calls.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = 1;
        while let Some(&mut (n, ref mut next)) = stack.last_mut() {
            if let Some(&d) = calls[n].deps.get(*next) {
                *next += 1;
                match state[d] {
                    0 => {
                        state[d] = 1;
                        stack.push((d, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|(x, _)| *x == d).unwrap_or(0);
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|(x, _)| *x).collect();
                        cycle.push(d);
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                state[n] = 2;
                stack.pop();
            }
        }
    }
    None
}

/// The place of a [`ComposeError`] in `src`: its span, moved to the line of its field when
/// the field is named and found in the same table (the lines from the table's header to the
/// next header), inline tables included.
pub fn locate(src: &str, e: &ComposeError) -> Option<Range<usize>> {
    let span = e.span.clone()?;
    let Some(field) = e.field else {
        return Some(span);
    };
    let start = span.start.min(src.len());
    // The table's header: the last line starting with '[' before the span.
    let mut table = 0;
    let mut pos = 0;
    for line in src[..start].split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            table = pos;
        }
        pos += line.len();
    }
    let mut pos = table;
    for (n, line) in src[table..].split_inclusive('\n').enumerate() {
        if n > 0 && line.trim_start().starts_with('[') {
            break;
        }
        let mut from = 0;
        while let Some(p) = line[from..].find(field) {
            let at = from + p;
            let before_ok = at == 0
                || !line.as_bytes()[at - 1].is_ascii_alphanumeric()
                    && line.as_bytes()[at - 1] != b'_';
            let after = &line[at + field.len()..];
            if before_ok && after.trim_start().starts_with(['=', '.']) {
                return Some(pos + at..pos + at + field.len());
            }
            from = at + field.len();
        }
        pos += line.len();
    }
    Some(span)
}
