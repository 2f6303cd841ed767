//! The cache phase: the action of a route with `cache = { ... }` (see the module chart in
//! `cache/mod.rs`). It answers from the worker's store, or goes upstream through the proxy's
//! own exchange (retries, breaker, endpoints) and relay, capturing what it may store.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::GatewayError;
use crate::http::chunked::ChunkedScanner;
use crate::http::encode::{put_header, put_status_line, put_u64, reason_phrase};
use crate::http::request::{parse_request, BodyKind, Method, RequestHead};
use crate::http::response::{RespBody, ResponseHead};
use crate::http::Version;
use crate::http::{ConnectionOptions, HeaderSpan};
use crate::proxy::attempt::{attempt, AttemptError, AttemptOpts, DownFail, InMemory};
use crate::proxy::conn::{
    end_head, read_some, write_buf, Answer, ClientIo, Conn, IoFail, Outcome, DRAIN_MAX,
};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::forward::{self, Chosen};
use crate::proxy::relay::forward_response_tee;
use crate::proxy::{Snapshot, Timeouts, Worker};
use crate::rewrite::{connection_value, encode_upstream_head, Forwarding};
use crate::router::Route;
use crate::upstream::{UpConn, UpstreamGroup, UPSTREAM_READ_BUF};

use super::fields::{Fields, FieldsRef};
use super::policy::{self, Directives, FieldName, RangeAnswer};
use super::{
    build_key, now_secs, url_of, Flight, FlightEnd, FlightGuard, FlightStream, KeyRef, Object,
    Purge, PurgeTarget, RoutePolicy, Sent, Tee, Timing, WorkerCache,
};

/// Bodies up to this size go out in the same write as their head.
const INLINE_BODY: usize = 16 * 1024;
/// Most fields a stored response may vary on: each is compared on every lookup, so a hostile
/// origin's long `Vary` is not stored.
const MAX_VARY_FIELDS: usize = 16;
/// Most times a request waits on another's fetch for the same key before fetching itself.
const MAX_COALESCE_ROUNDS: usize = 4;

/// Runs the cache phase for a route with a cache policy.
pub async fn run<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group_idx: usize,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
) -> Outcome<'c> {
    let group = &cfg.upstreams[group_idx];
    // The target URI's scheme (RFC 9112 §3.3): an absolute-form target's own, else the
    // connection's, and behind a trusted proxy the proxy's word (see
    // [`proxy_says_https`]).
    let scheme_split = if ctx.head.is_absolute_form() {
        std::hint::cold_path();
        scheme_split(&ctx.head, c.info.tls, c.info.trusted, &cfg.trusted_proxies)
    } else {
        if c.info.trusted && !ctx.head.https && proxy_says_https(&ctx.head, &cfg.trusted_proxies) {
            ctx.head.https = true;
        }
        false
    };
    if p.purge && ctx.head.method == Method::Other && ctx.head.method_str() == b"PURGE" {
        return purge_request(w, p, c, ctx).await;
    }
    match ctx.head.method {
        Method::Get | Method::Head => {
            // Read where they are kept for the request (in its future), not returned and
            // copied there.
            let mut req = Directives::default();
            let seen = request_directives(p, route, &ctx.head, &mut req);
            let authorized = seen.authorized;
            // A request with content (RFC 9110 §9.3.1: none defined for GET or HEAD, but an
            // origin that reads it answers per body, and the key is the URL's): forwarded as
            // it is, never answered from the store, stored, or joined to another's fetch.
            if matches!(ctx.head.body, BodyKind::Chunked | BodyKind::Length(1..)) {
                std::hint::cold_path();
                return bypass(w, cfg, route, p, group, c, ctx, &req, "request-body").await;
            }
            // A header some origins obey to answer for another URL, method or host, which the
            // key does not hold: what such an answer would store under this URL could poison
            // it for everyone (web cache poisoning). Forwarded as it is, like the above.
            if seen.overridden {
                std::hint::cold_path();
                // An origin that obeys a method override to an unsafe method changes the
                // resource: its stored responses are invalidated as the method's own would
                // be (RFC 9111 §4.4). Not with `only-if-cached`: such a request gets a stored
                // response or a 504 (§5.2.1.7), and the store cannot answer it, so it gets the
                // 504 below, unforwarded, and nothing is invalidated.
                if !req.only_if_cached && overrides_to_unsafe(&ctx.head) {
                    let mut url = Vec::new();
                    url_of(&ctx.head, &mut url);
                    let mut s = Status::new(p, "bypass");
                    s.detail = Some("override-header");
                    let f = Fetch::Invalidate(url, scheme_split);
                    return fetch(w, cfg, route, p, group, c, ctx, f, &mut s).await;
                }
                return bypass(w, cfg, route, p, group, c, ctx, &req, "override-header").await;
            }
            // The origin would answer for another origin than the key names (see
            // [`scheme_split`]): forwarded as it is, like the above.
            if scheme_split {
                std::hint::cold_path();
                return bypass(w, cfg, route, p, group, c, ctx, &req, "target-scheme").await;
            }
            let as_sent = sent(cfg, route, c, ctx);
            let keys = Keys::new(p, ctx, &as_sent, c.info.client_subject.as_deref(), &w.cache);
            // The usual miss goes upstream from here ([`fill`]): [`cached`], for all the
            // other cases, would be one more future to enter and leave on each of the
            // fetch's polls.
            // What `cached` is given when the request is not the usual miss or a hit.
            let look = 'fill: {
                match first_look(&w.cache, &as_sent, &keys, &req) {
                    Look::Miss { any, now } => {
                        // Begun here, not in `first_look`: the guard goes from the call into
                        // the fetch, not through a `Look` kept in this future. A fetch of the
                        // key in flight is joined by `cached` (or, for another key under the
                        // same hash, fetched alone there).
                        let Some(guard) = w.cache.begin_unless_in_flight(keys.shared_key()) else {
                            break 'fill (None, any, now);
                        };
                        w.cache.count(|s| s.misses += 1);
                        let mut fwd = if any { "vary-miss" } else { USUAL_MISS_FWD };
                        let (mut guard, mut now) = (guard, now);
                        // A stored piece from byte 0 may be completed instead (RFC 9111 §3.4);
                        // looked for only once the worker has stored one.
                        if w.cache.has_pieces() {
                            let sent = sent(cfg, route, c, ctx);
                            if let Some(piece) =
                                piece_to_complete(&w.cache, &sent, &keys, &req, p, now)
                            {
                                // Boxed: its future stays out of this one's size. `fill` is
                                // called here only (not from `complete` too), so that its
                                // code stays inlined in this future's for the usual miss.
                                match Box::pin(complete(
                                    w, cfg, route, p, group, c, ctx, &keys, guard, &req,
                                    authorized, now, piece,
                                ))
                                .await
                                {
                                    Completion::Done(out) => return out,
                                    Completion::Whole(g, t) => {
                                        (guard, now, fwd) = (g, t, PARTIAL_FWD);
                                    }
                                }
                            }
                        }
                        return fill(
                            w, cfg, route, p, group, c, ctx, &keys, guard, &req, authorized, now,
                            fwd,
                        )
                        .await;
                    }
                    Look::Fresh { obj, now } => {
                        let s = Status::hit(p, &obj, now);
                        return answer(w, &cfg.via, route, c, ctx, &obj, now, &s).await;
                    }
                    Look::TooLong => {
                        std::hint::cold_path();
                        let mut s = Status::new(p, "bypass");
                        s.detail = Some("key-too-long");
                        return fetch(w, cfg, route, p, group, c, ctx, Fetch::Pass, &mut s).await;
                    }
                    Look::Other { hit, any, now } => break 'fill (hit, any, now),
                }
            };
            cached(
                w, cfg, route, p, group_idx, c, ctx, &keys, &req, authorized, look,
            )
            .await
        }
        // Forwarded for their method (RFC 9211 §2.2 `fwd=method`), through the cache's own
        // fetch so that their answer, a failure's too, carries the cache's member.
        Method::Options | Method::Trace => {
            let mut s = Status::new(p, "method");
            fetch(w, cfg, route, p, group, c, ctx, Fetch::Pass, &mut s).await
        }
        _ => {
            let mut url = Vec::new();
            url_of(&ctx.head, &mut url);
            let mut s = Status::new(p, "bypass");
            s.fwd = "method";
            fetch(
                w,
                cfg,
                route,
                p,
                group,
                c,
                ctx,
                Fetch::Invalidate(url, scheme_split),
                &mut s,
            )
            .await
        }
    }
}

/// Whether a method-override header (`X-HTTP-Method-Override`, `X-HTTP-Method`,
/// `X-Method-Override`, `_` for `-` too) names a method other than GET, HEAD, OPTIONS or
/// TRACE: one that an origin obeying it would treat as unsafe.
#[cold]
#[inline(never)]
fn overrides_to_unsafe(head: &RequestHead) -> bool {
    const NAMES: [&[u8]; 6] = [
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x_http_method_override",
        b"x_http_method",
        b"x_method_override",
    ];
    NAMES.iter().any(|n| {
        head.header_values(n).any(|v| {
            let v = crate::http::trim_ows(v);
            ![&b"GET"[..], b"HEAD", b"OPTIONS", b"TRACE"]
                .iter()
                .any(|m| v.eq_ignore_ascii_case(m))
        })
    })
}

/// A GET or HEAD that the store may not answer, that may not be stored, nor share another's
/// fetch, for `detail` (its `Cache-Status`, with `fwd=bypass`): forwarded as it is, or, with
/// `only-if-cached`, answered 504 (RFC 9111 §5.2.1.7: nothing stored may answer it).
#[allow(clippy::too_many_arguments)]
async fn bypass<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    req: &Directives,
    detail: &'static str,
) -> Outcome<'c> {
    let mut s = Status::new(p, "bypass");
    s.detail = Some(detail);
    if req.only_if_cached {
        return gateway_answer(w, c, ctx, 504, &s).await;
    }
    fetch(w, cfg, route, p, group, c, ctx, Fetch::Pass, &mut s).await
}

/// What the first look in the store for a GET or HEAD decided.
enum Look<'k> {
    /// The key is too long to store: the request goes through (bypass).
    TooLong,
    /// A hit (§4.2): `obj` may answer as it is at `now` (counted).
    Fresh { obj: Rc<Object>, now: u64 },
    /// The usual miss: a GET with nothing stored under its keys and no Redis layer to ask,
    /// for `run` to begin its fetch unless one of its key is in flight (then [`cached`]);
    /// `now` is when the store was looked in, `any` whether any variant is stored.
    Miss { any: bool, now: u64 },
    /// Any other case, for [`cached`]: what the lookup found at `now`, and whether any variant
    /// is stored.
    Other {
        hit: Option<Hit<'k>>,
        any: bool,
        now: u64,
    },
}

/// Looks for the request in the store: a hit to answer, or the usual miss (see [`Look::Miss`]):
/// nothing the request could be answered with is there.
// One caller (`run`): inlined, its `Look` taken apart where it is made rather than written
// out and read back after a call.
#[inline(always)]
fn first_look<'k>(
    cache: &Rc<WorkerCache>,
    sent: &Sent<'_>,
    keys: &'k Keys<'k>,
    req: &Directives,
) -> Look<'k> {
    let head = sent.head;
    if keys.shared.len() > super::MAX_KEY_BYTES {
        return Look::TooLong;
    }
    let now = now_secs();
    let (hit, any) = keys.lookup(cache, sent);
    if let Some(h) = hit {
        if matches!(usable(&h.obj, req, now), Use::Fresh | Use::StaleOk) {
            cache.count(|s| s.hits += 1);
            return Look::Fresh { obj: h.obj, now };
        }
        return Look::Other {
            hit: Some(h),
            any,
            now,
        };
    }
    // A stored piece (a 206) answers a range nothing whole answers; looked for only once
    // the worker has stored one (one test on the miss's path until then).
    if cache.has_pieces() {
        if let Some(obj) = piece_for(cache, sent, keys, req, now) {
            cache.count(|s| s.hits += 1);
            return Look::Fresh { obj, now };
        }
    }
    if req.only_if_cached || head.method != Method::Get || cache.shared().is_some() {
        return Look::Other {
            hit: None,
            any,
            now,
        };
    }
    Look::Miss { any, now }
}

/// RFC 9110 §4.2.3 behind a TLS-terminating proxy (one of `server.trusted_proxies`, whose
/// forwarding fields are believed, see [`crate::rewrite`]): whether the proxies say the
/// client used `https`, the scheme of an origin-form target then. Then port 443 is the
/// default one (`Host: a.test:443` keys, stores and purges as `a.test`, as on a TLS listener)
/// and 80 is not. The request head's scheme is read by the cache's keys alone.
///
/// Which hop's word is taken follows the rule rate limiting uses for the client's address
/// (`X-Forwarded-For` walked from the right, the first element that is not a trusted proxy,
/// see `crate::proxy::phases`): proxies append, so the elements left of the ones they wrote
/// may be the client's own (RFC 7239 §4, §8.1). In `Forwarded`, the `proto` of that element
/// (walked by its `for`); in `X-Forwarded-Proto` (read first), the item at the same place
/// from the right as the client's element in `X-Forwarded-For` (the rightmost when there is
/// none; the leftmost when there are fewer items, a proxy having replaced the field).
/// Before, the first item or element was read: a client behind a proxy that appends chose
/// its scheme by sending its own.
///
/// Read in place, with no allocation: behind a load balancer every request comes from a
/// trusted peer.
///
/// Only for an origin-form target, whose URI the recipient rebuilds: an absolute-form target
/// is the target URI, its scheme included (RFC 9112 §3.2.2, §3.3), whatever a proxy says
/// (see [`scheme_split`]).
#[inline(never)]
fn proxy_says_https(head: &RequestHead, trusted: &crate::config::TrustedProxies) -> bool {
    let proto = if head.header(b"x-forwarded-proto").is_some() {
        let back = client_from_right(list_items(head.header_values(b"x-forwarded-for")), |e| {
            crate::proxy::phases::forwarded_ip(e).is_some_and(|ip| trusted.contains(ip))
        });
        let items = || list_items(head.header_values(b"x-forwarded-proto"));
        let n = items().count();
        items().nth(n.saturating_sub(1 + back)).unwrap_or(b"")
    } else if head.header(b"forwarded").is_some() {
        let elements = || list_items(head.header_values(b"forwarded"));
        let back = client_from_right(elements(), |e| {
            let f = forwarded_param(e, b"for");
            crate::proxy::phases::forwarded_ip(f).is_some_and(|ip| trusted.contains(ip))
        });
        let n = elements().count();
        let e = elements().nth(n.saturating_sub(1 + back)).unwrap_or(b"");
        forwarded_param(e, b"proto")
    } else {
        return false;
    };
    proto.eq_ignore_ascii_case(b"https")
}

/// Whether an absolute-form target's scheme, which the key follows (RFC 9112 §3.3), differs
/// from the one the origin is told, in a way that moves the key: its port (`:80`, `:443`) is
/// the default of one and not the other. The origin is told the connection's scheme, or
/// behind a trusted proxy the proxy's word (its `X-Forwarded-Proto` or `Forwarded` goes on as
/// sent, read as [`proxy_says_https`] reads it), never the target's, which a client chooses:
/// telling it would let a client on plain HTTP pass for one on TLS. With a split, the origin
/// reads the forwarded `Host` as another origin than the key names (`http://a.test:80`, keyed
/// `a.test`, as `https://a.test:80`): the request is forwarded, but not looked up or stored.
/// A port that is neither, or none, keys the same under either scheme (the key names no
/// scheme).
#[cold]
#[inline(never)]
fn scheme_split(
    head: &RequestHead,
    tls: bool,
    trusted: bool,
    proxies: &crate::config::TrustedProxies,
) -> bool {
    let told = tls || (trusted && proxy_says_https(head, proxies));
    told != head.https && super::scheme_moves_port(head.host_bytes().unwrap_or(b""))
}

/// The items of a list field's lines, in order, trimmed, empty ones left out (RFC 9110
/// §5.6.1).
fn list_items<'a>(
    lines: impl Iterator<Item = &'a [u8]> + 'a,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    lines
        .flat_map(|v| v.split(|b| *b == b','))
        .map(crate::http::trim_ows)
        .filter(|e| !e.is_empty())
}

/// Where the client's element is, counted from the right (0: the rightmost), among hops'
/// elements in order: the rightmost one that `trusted` does not take for a trusted proxy's;
/// the leftmost when every one is; 0 when there is none.
fn client_from_right<'a>(
    items: impl Iterator<Item = &'a [u8]>,
    trusted: impl Fn(&[u8]) -> bool,
) -> usize {
    let (mut n, mut client) = (0, None);
    for (i, e) in items.enumerate() {
        n = i + 1;
        if !trusted(e) {
            client = Some(i);
        }
    }
    n.saturating_sub(1 + client.unwrap_or(0))
}

/// The value of the parameter `name` of one `Forwarded` element (RFC 7239 §4), unquoted;
/// empty when it has none.
fn forwarded_param<'a>(element: &'a [u8], name: &[u8]) -> &'a [u8] {
    element
        .split(|b| *b == b';')
        .find_map(|pair| {
            let eq = pair.iter().position(|b| *b == b'=')?;
            let (k, v) = (crate::http::trim_ows(&pair[..eq]), &pair[eq + 1..]);
            if !k.eq_ignore_ascii_case(name) {
                return None;
            }
            let v = crate::http::trim_ows(v);
            Some(
                v.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v),
            )
        })
        .unwrap_or(b"")
}

/// The largest sf-integer (RFC 8941 §3.3.1), for `Cache-Status`'s `ttl`.
const SF_INTEGER_MAX: i64 = 999_999_999_999_999;

/// The `Cache-Status` member (RFC 9211 §2) this cache adds.
struct Status<'p> {
    name: &'p [u8],
    hit: bool,
    fwd: &'static str,
    fwd_status: u16,
    ttl: Option<i64>,
    stored: bool,
    collapsed: bool,
    detail: Option<&'static str>,
}

impl<'p> Status<'p> {
    /// What storing a piece ([`piece_whole`]) says: `stored`, or why not. Whether it was.
    fn note_kept(&mut self, kept: Result<(), &'static str>) -> bool {
        match kept {
            Ok(()) => {
                self.detail = None;
                self.stored = true;
                true
            }
            Err(d) => {
                self.detail = Some(d);
                false
            }
        }
    }

    fn new(p: &'p RoutePolicy, fwd: &'static str) -> Status<'p> {
        Status {
            name: &p.name,
            hit: false,
            fwd,
            fwd_status: 0,
            ttl: None,
            stored: false,
            collapsed: false,
            detail: None,
        }
    }

    /// A hit: `o` answered from the store, with its remaining freshness at `now`.
    fn hit(p: &'p RoutePolicy, o: &Object, now: u64) -> Status<'p> {
        let mut s = Status::new(p, "");
        s.hit = true;
        s.ttl = Some(o.ttl(now));
        s
    }

    /// The field line, written out part by part.
    fn write_line(&self, out: &mut Vec<u8>) {
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b"cache-status: ");
        out.extend_from_slice(self.name);
        if self.hit {
            out.extend_from_slice(b"; hit");
        } else {
            out.extend_from_slice(b"; fwd=");
            out.extend_from_slice(self.fwd.as_bytes());
            if self.fwd_status != 0 {
                out.extend_from_slice(b"; fwd-status=");
                out.extend_from_slice(n.format(self.fwd_status).as_bytes());
            }
        }
        if let Some(t) = self.ttl {
            // An sf-integer has at most 15 digits (RFC 8941 §3.3.1); a lifetime read from
            // Redis may be any u64.
            let t = t.clamp(-SF_INTEGER_MAX, SF_INTEGER_MAX);
            out.extend_from_slice(b"; ttl=");
            out.extend_from_slice(n.format(t).as_bytes());
        }
        if self.stored {
            out.extend_from_slice(b"; stored");
        }
        if self.collapsed {
            out.extend_from_slice(b"; collapsed");
        }
        if let Some(d) = self.detail {
            out.extend_from_slice(b"; detail=");
            out.extend_from_slice(d.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }

    /// [`Status::put`] for the response of a fetch: a route's usual miss (a new URL, the
    /// upstream's 200), stored or refused by `no-store`, is copied whole from `p`
    /// ([`usual_miss_line`]), the others written as `put` writes them.
    #[inline(always)]
    fn put_fetched(&self, p: &RoutePolicy, out: &mut BytesMut) {
        match self.usual(p) {
            Some(line) => out.put_slice(line),
            None => self.put(out),
        }
    }

    /// The line [`usual_miss_line`] wrote for `p` when this is one of those.
    #[inline(always)]
    fn usual<'a>(&self, p: &'a RoutePolicy) -> Option<&'a [u8]> {
        if self.fwd_status != 200
            || self.hit
            || self.collapsed
            || self.ttl.is_some()
            || !same_str(self.fwd, USUAL_MISS_FWD)
            || !std::ptr::eq(self.name, &*p.name)
        {
            return None;
        }
        match (self.stored, self.detail) {
            (true, None) => Some(&p.status_stored),
            (false, Some(d)) if same_str(d, NO_STORE) => Some(&p.status_no_store),
            _ => None,
        }
    }

    /// Writes the field line. Most lines repeat the one before on this worker (every stored
    /// miss of a route, a hot object's hits within a second): that one is kept, and copied
    /// whole when it is the same.
    fn put(&self, out: &mut BytesMut) {
        LAST_STATUS.with(|last| {
            let last = &mut *last.borrow_mut();
            let same = last.of.as_ref().is_some_and(|s| s.same_parts(self))
                && policy::same_bytes(&last.name, self.name);
            if !same {
                self.remember(last);
            }
            out.put_slice(&last.line);
        })
    }

    /// Writes the line into `last` and keeps its parts there. Out of [`Status::put`]'s way:
    /// the usual line is the one before, copied with fewer registers to save.
    #[inline(never)]
    fn remember(&self, last: &mut LastStatus) {
        last.line.clear();
        self.write_line(&mut last.line);
        last.of = Some(Status {
            name: b"",
            hit: self.hit,
            fwd: self.fwd,
            fwd_status: self.fwd_status,
            ttl: self.ttl,
            stored: self.stored,
            collapsed: self.collapsed,
            detail: self.detail,
        });
        last.name.clear();
        last.name.extend_from_slice(self.name);
    }

    /// The same line but perhaps for the name.
    fn same_parts(&self, o: &Status<'_>) -> bool {
        self.hit == o.hit
            && self.fwd_status == o.fwd_status
            && self.ttl == o.ttl
            && self.stored == o.stored
            && self.collapsed == o.collapsed
            && same_str(self.fwd, o.fwd)
            && match (self.detail, o.detail) {
                (None, None) => true,
                (Some(a), Some(b)) => same_str(a, b),
                _ => false,
            }
    }
}

/// The forward reason of a miss on a URL with nothing stored (RFC 9211 §2.2).
const USUAL_MISS_FWD: &str = "uri-miss";

/// The forward reason of a request a stored piece was to be completed for (RFC 9211 §2.2:
/// "the cache had a partial response and needed to complete it"), the rest asked for or, when
/// that cannot be done or its answer is unusable, the whole ([`complete`]).
const PARTIAL_FWD: &str = "partial";

/// The `Cache-Status` detail of a response not stored for its `no-store` ([`screen`]).
const NO_STORE: &str = "no-store";

/// The `Cache-Status` detail of a storable response whose body was still on its way when its
/// head went out: whether it is stored is known only once the body is whole (RFC 9211 §2.5).
const STREAMED: &str = "streamed";

/// The `Cache-Status` line of a usual miss (a new URL, the upstream's 200) of a cache named
/// `name`: stored, or else not stored for `no_store_detail` when it is given. Each route's
/// policy keeps both ([`RoutePolicy`]), and [`Status::put_fetched`] copies them whole.
pub(super) fn usual_miss_line(name: &[u8], no_store_detail: bool) -> Box<[u8]> {
    let s = Status {
        name,
        hit: false,
        fwd: USUAL_MISS_FWD,
        fwd_status: 200,
        ttl: None,
        stored: !no_store_detail,
        collapsed: false,
        detail: no_store_detail.then_some(NO_STORE),
    };
    let mut line = Vec::new();
    s.write_line(&mut line);
    line.into()
}

/// `a == b` for the static words of a `Cache-Status` line, which are mostly the same literal:
/// the same one is known equal without reading it.
#[inline(always)]
fn same_str(a: &'static str, b: &'static str) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// The last `Cache-Status` line this worker wrote (see [`Status::put`]).
struct LastStatus {
    /// Its parts, the name aside (in `name`).
    of: Option<Status<'static>>,
    name: Vec<u8>,
    line: Vec<u8>,
}

thread_local! {
    static LAST_STATUS: std::cell::RefCell<LastStatus> = const {
        std::cell::RefCell::new(LastStatus {
            of: None,
            name: Vec::new(),
            line: Vec::new(),
        })
    };
}

/// What the cache's pass over a request's fields ([`request_directives`]) found besides its
/// directives.
struct RequestSeen {
    /// The request has `Authorization` (§3.5).
    authorized: bool,
    /// The request has an override header ([`OVERRIDE_HEADERS`]) that reaches the origin
    /// and is not in the key.
    overridden: bool,
}

/// Request headers some origins (and frameworks in front of them) obey to answer for another
/// URL, method, host or scheme than the request's: the classic web cache poisoning vectors.
/// The key holds none of them (unless the route keys on one, `key.headers`), so a request
/// with one is not served from the store nor stored (see `run`). Lower case.
const OVERRIDE_HEADERS: [&[u8]; 7] = [
    b"x-original-url",
    b"x-rewrite-url",
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
    b"x-host",
    b"x-forwarded-scheme",
];

/// The lengths of [`OVERRIDE_HEADERS`] modulo 64, as bits: a name whose length's bit is clear
/// is none of them.
const OVERRIDE_LENS: u64 = {
    let mut bits = 0u64;
    let mut i = 0;
    while i < OVERRIDE_HEADERS.len() {
        bits |= 1 << (OVERRIDE_HEADERS[i].len() % 64);
        i += 1;
    }
    bits
};

/// Adds the request's cache directives (RFC 9111 §5.2.1) to `d` (empty: the default);
/// `Pragma: no-cache` counts as `no-cache` when there is no `Cache-Control` (§5.4). Notes in
/// the same pass whether the request has `Authorization` (§3.5) and an override header that
/// reaches the origin unkeyed ([`OVERRIDE_HEADERS`]; the route's `p` and `route` say what it
/// keys on and what it removes).
// One caller (`run`): inlined, the directives written in place rather than returned.
#[inline(always)]
fn request_directives(
    p: &RoutePolicy,
    route: &Route,
    head: &RequestHead,
    d: &mut Directives,
) -> RequestSeen {
    // One pass over the fields for the three names (two of them of one length).
    let mut any = false;
    let mut pragma_no_cache = false;
    let mut authorized = false;
    let mut overridden = false;
    for h in &head.headers {
        let name = head.bytes(h.name);
        if name.len() == 13 {
            if name.eq_ignore_ascii_case(b"cache-control") {
                any = true;
                d.add(head.bytes(h.value));
            } else if name.eq_ignore_ascii_case(b"authorization") {
                authorized = true;
            }
        } else if !pragma_no_cache && name.eq_ignore_ascii_case(b"pragma") {
            pragma_no_cache = crate::http::list_items(head.bytes(h.value))
                .any(|i| i.eq_ignore_ascii_case(b"no-cache"));
        }
        // An override header's length and `x-` first (`x_` too: a CGI-style origin reads it
        // as the same name), else nothing more is looked at: most names stop at the length.
        if OVERRIDE_LENS >> (name.len() % 64) & 1 == 1 {
            if let [x, b'-' | b'_', ..] = name {
                if *x | 0x20 == b'x' {
                    overridden |= unkeyed_override(p, route, name);
                }
            }
        }
    }
    if !any && pragma_no_cache {
        d.no_cache = true;
    }
    RequestSeen {
        authorized,
        overridden,
    }
}

/// Whether `name` (an `x-` name of an override header's length) is one of
/// [`OVERRIDE_HEADERS`], in any case, `_` read as `-`, that reaches the origin as the client
/// sent it and that the key does not hold: not keyed by the route (`key.headers`, the name as
/// sent), not removed or set by its `request_headers`.
#[cold]
#[inline(never)]
fn unkeyed_override(p: &RoutePolicy, route: &Route, name: &[u8]) -> bool {
    let cgi_same = |o: &[u8]| {
        o.len() == name.len()
            && o.iter()
                .zip(name)
                .all(|(a, b)| *a == b.to_ascii_lowercase() || (*a == b'-' && *b == b'_'))
    };
    OVERRIDE_HEADERS.iter().any(|o| cgi_same(o))
        && !p.key_headers.iter().any(|k| k.eq_ignore_ascii_case(name))
        && !route.request_headers.drops(name)
}

/// Who the request is, for the keys of its own entries: on routes with an auth policy its
/// consumer, and with a verified client certificate its subject (`cert`) before it; `None` when
/// an auth route's caller has no name. The subject part starts with a NUL, which neither a
/// consumer's name nor a token's `sub:` does, and holds none (it is a header value), so no
/// identity is another's.
#[cold]
#[inline(never)]
fn identity_of(p: &RoutePolicy, ctx: &RequestCtx<'_>, cert: Option<&[u8]>) -> Option<Vec<u8>> {
    let consumer = if p.auth {
        Some(consumer_of(ctx)?)
    } else {
        None
    };
    let Some(subject) = cert else {
        return consumer;
    };
    let mut id =
        Vec::with_capacity(6 + subject.len() + 1 + consumer.as_ref().map_or(0, |c| c.len()));
    id.extend_from_slice(b"\0cert:");
    id.extend_from_slice(subject);
    id.push(0);
    id.extend_from_slice(consumer.as_deref().unwrap_or_default());
    Some(id)
}

/// Who the request is, for keys on routes with an auth policy.
fn consumer_of(ctx: &RequestCtx<'_>) -> Option<Vec<u8>> {
    if let Some(n) = ctx.identity.consumer_name() {
        return Some(n.as_bytes().to_vec());
    }
    match ctx.identity.claim("sub") {
        Some(serde_json::Value::String(s)) => Some([b"sub:", s.as_bytes()].concat()),
        _ => None,
    }
}

/// Where a stored response was found.
struct Found {
    obj: Rc<Object>,
    key: Vec<u8>,
}

struct Keys<'w> {
    /// Entries any caller may use (public responses on auth routes; all others elsewhere).
    shared: Vec<u8>,
    /// `shared`'s hash ([`WorkerCache::key`]), for its lookups and its flight.
    hash: u64,
    /// This consumer's entries (auth routes), this client certificate's (requests with one).
    own: Option<Vec<u8>>,
    /// Non-public responses are stored under `own`: the route has an auth policy, or the
    /// request came with a verified client certificate (whose subject went upstream).
    personal: bool,
    /// Where `shared`'s buffer goes back when the request is done with it.
    cache: &'w WorkerCache,
    /// The worker's purge count when the store was looked in ([`WorkerCache::purges`]),
    /// before any request of this one's went upstream: what is fetched is checked against
    /// the purges and invalidations applied since before it is stored (RFC 9111 §4.4).
    /// Taken again when the request goes upstream again after one of its own (a 304 that
    /// selected nothing).
    purges: std::cell::Cell<u64>,
}

impl Drop for Keys<'_> {
    fn drop(&mut self) {
        self.cache.give_key_buf(std::mem::take(&mut self.shared));
    }
}

impl<'w> Keys<'w> {
    // One caller (`run`): inlined, without a call's saves and a copy of the result.
    #[inline(always)]
    fn new(
        p: &RoutePolicy,
        ctx: &RequestCtx<'_>,
        sent: &Sent<'_>,
        cert: Option<&[u8]>,
        cache: &'w WorkerCache,
    ) -> Keys<'w> {
        let personal = p.auth || cert.is_some();
        let consumer = if personal {
            identity_of(p, ctx, cert)
        } else {
            None
        };
        // Made first and its key built in it where the request keeps it (not in a buffer
        // moved there after).
        let mut keys = Keys {
            shared: cache.key_buf(),
            hash: 0,
            own: None,
            personal,
            cache,
            purges: std::cell::Cell::new(cache.purges()),
        };
        // One call for the shared key; the consumer's own key, on auth routes only, is built
        // out of line.
        let shared_consumer = match (&consumer, p.key_consumer) {
            (_, false) => None,
            (Some(cn), true) => Some(&cn[..]),
            (None, true) => Some(&b""[..]),
        };
        build_key(p, sent, shared_consumer, &mut keys.shared);
        keys.hash = cache.key(&keys.shared).hash;
        if let Some(cn) = consumer.filter(|_| !p.key_consumer) {
            keys.own = Some(own_key(p, sent, &cn));
        }
        keys
    }

    /// The shared key with its hash.
    fn shared_key(&self) -> KeyRef<'_> {
        KeyRef {
            hash: self.hash,
            bytes: &self.shared,
        }
    }

    /// The key a response is stored under: shared when it is public (or the route has no
    /// auth and the request no client certificate), the consumer's or certificate's
    /// otherwise; `None` when an auth route's caller has no name.
    fn store_key(&self, p: &RoutePolicy, public: bool) -> Option<&[u8]> {
        if !self.personal || p.key_consumer || public {
            Some(&self.shared)
        } else {
            self.own.as_deref()
        }
    }

    /// The stored response `head` selects and the key it is under (borrowed: a hit needs no
    /// copy of it, see [`Hit::found`]), and whether any variant is stored.
    // Inlined in `first_look`, where its result is looked at at once (`cached` looks again
    // only after a wait).
    #[inline(always)]
    fn lookup(&self, cache: &WorkerCache, req: &Sent<'_>) -> (Option<Hit<'_>>, bool) {
        let (o, any) = cache.lookup(self.shared_key(), req);
        if let Some(obj) = o {
            return (
                Some(Hit {
                    obj,
                    key: &self.shared,
                }),
                true,
            );
        }
        if let Some(k) = &self.own {
            let (o, any2) = cache.lookup(cache.key(k), req);
            if let Some(obj) = o {
                return (Some(Hit { obj, key: k }), true);
            }
            return (None, any || any2);
        }
        (None, any)
    }
}

/// The key of a consumer's own entries (an auth route's private responses).
#[inline(never)]
fn own_key(p: &RoutePolicy, sent: &Sent<'_>, consumer: &[u8]) -> Vec<u8> {
    let mut k = Vec::new();
    build_key(p, sent, Some(consumer), &mut k);
    k
}

/// A stored response found under one of the request's [`Keys`].
struct Hit<'k> {
    obj: Rc<Object>,
    key: &'k [u8],
}

impl Hit<'_> {
    /// With its key owned, for what outlives the lookup (validation, revalidation).
    fn found(self) -> Found {
        Found {
            obj: self.obj,
            key: self.key.to_vec(),
        }
    }
}

/// How a stored response may be used for this request.
#[derive(Debug, PartialEq, Eq)]
enum Use {
    /// Fresh enough: answer.
    Fresh,
    /// Stale, and the client accepts it (`max-stale`).
    StaleOk,
    /// Stale within `stale-while-revalidate`: answer, revalidate in the background.
    StaleRevalidate,
    /// Validation needed first.
    Validate,
}

/// The Redis layer's entry for the request (`[cache.redis]`), newer than `found` (what this
/// worker holds, if anything), with how it may be used now: the first of the request's keys
/// whose entry matches its Vary values. The entry is put in this worker's store. `None`: no
/// layer, nothing there, or no answer within the layer's timeout (fail open). `others` is set
/// when Redis holds a variant of the key that the request's Vary values do not select (RFC
/// 9211 §2.2: the miss is then a `vary-miss`).
async fn from_shared(
    w: &Worker,
    keys: &Keys<'_>,
    sent: &Sent<'_>,
    req: &Directives,
    p: &RoutePolicy,
    found: Option<&Found>,
    others: &mut bool,
) -> Option<(Found, Use)> {
    let cache = &w.cache;
    let layer = cache.shared().cloned()?;
    let mut ks: Vec<&[u8]> = vec![&keys.shared];
    if let Some(o) = &keys.own {
        ks.push(o);
    }
    // A variant held here names the fields the key varies on: the request's variant is
    // then asked for in the same round trip.
    let held: Vec<Option<Rc<Object>>> = ks
        .iter()
        .map(|k| cache.get(k).and_then(|v| v.into_iter().next()))
        .collect();
    let known: Vec<Option<&Object>> = held.iter().map(|o| o.as_deref()).collect();
    // An entry asked for before a purge or invalidation of its URL that is applied here while
    // Redis answers is from before it (§4.4): not stored, not served. So is one that a purge
    // applied here still has to delete in Redis covers, received before it (one by prefix
    // deletes after a scan's round trip; another worker's may be sent after this worker
    // applied it; one made while the link was down is sent again once it is up).
    let purges = cache.purges();
    let pending = cache.pending_in_redis();
    let got = layer.get(&w.doorbell, &ks, &known, sent, others).await;
    let now = now_secs();
    // An entry is the request's URL's, as the route's key reads it: the URL as sent, or,
    // where the key leaves the host or part of the query out, the keyed URL objects of the
    // route are stored under ([`super::keyed_url`], which every URL of one key shares).
    // Purges and invalidations find a stored response by that URL (RFC 9111 §4.4), and an
    // entry naming another would be kept here under this key and escape a purge of it (a
    // corrupt or planted entry; one ringway wrote always matches, but one an earlier build
    // wrote on a custom-key route, under the URL of the request that stored it, is a miss).
    let mut url = Vec::new();
    super::url_of(sent.head, &mut url);
    if let Some(k) = super::keyed_url(p, &url) {
        url = k;
    }
    for (k, o) in ks.iter().zip(got) {
        let Some((o, heard)) = o.filter(|(o, _)| o.vary_matches(sent) && o.url[..] == url[..])
        else {
            continue;
        };
        // Not older than the copy held here: one from the same second may be that copy
        // validated since (by another worker or host), which the response time cannot tell.
        if found.is_some_and(|f| f.obj.t.response_time > o.t.response_time)
            || cache.purged_since(purges, &o).is_some()
            || cache.pending_in_redis_covers(pending.as_deref(), &o)
        {
            continue;
        }
        // Written by a worker that had not applied a purge by prefix or of everything that
        // covers it (its write may have landed after the purge deleted the copies, §4.4):
        // refused after a hard one, stale after a soft one.
        match cache.wide_purge_covers(&o, heard) {
            None => {}
            Some(true) => o.invalid.set(true),
            Some(false) => continue,
        }
        let mut o = o;
        drop_forged_stored(p, &mut o.fields);
        let o = Rc::new(o);
        cache.insert(k, o.clone(), p.max_variants);
        let u = usable(&o, req, now);
        let f = Found {
            obj: o,
            key: k.to_vec(),
        };
        return Some((f, u));
    }
    None
}

fn usable(o: &Object, req: &Directives, now: u64) -> Use {
    let age = o.t.age(now);
    let ttl = o.ttl(now);
    // `max-age=0` asks for validation whatever the age (§5.2.1.1, seconds being coarse).
    let fresh_enough = o.is_fresh(now)
        && req.max_age.is_none_or(|m| m > 0 && age <= m)
        && req.min_fresh.is_none_or(|m| ttl >= m as i64);
    if req.no_cache || o.t.always_validate {
        return Use::Validate;
    }
    if fresh_enough {
        return Use::Fresh;
    }
    if o.t.no_stale || o.is_fresh(now) {
        // Fresh but not fresh enough for the client, or stale use forbidden (§4.2.4).
        return Use::Validate;
    }
    let stale = (-ttl).max(0) as u64;
    if let Some(ms) = req.max_stale {
        if ms.is_none_or(|m| stale <= m) {
            return Use::StaleOk;
        }
    }
    // RFC 5861 §3 allows it, unless the client said it takes no response this stale: a
    // `max-age`, a `max-stale` that does not cover it (§5.2.1.1, §5.2.1.2: one that does was
    // answered above), or a `min-fresh` (§5.2.1.3: a stale response is fresh for no more
    // seconds).
    if req.max_age.is_none()
        && req.max_stale.is_none()
        && req.min_fresh.is_none()
        && o.t.swr > 0
        && stale <= o.t.swr
    {
        return Use::StaleRevalidate;
    }
    Use::Validate
}

/// Whether a stale response may answer for an upstream failure (RFC 5861 §4).
fn stale_if_error(o: &Object, req: &Directives, now: u64) -> bool {
    if o.t.no_stale || o.t.always_validate {
        return false;
    }
    let stale = (-o.ttl(now)).max(0) as u64;
    let window = req.stale_if_error.unwrap_or(o.t.sie);
    window > 0 && stale <= window
}

/// When a stale answer is given, whether the request waited on another's fetch, and whether
/// it said `no-store`.
struct StaleAnswer {
    now: u64,
    collapsed: bool,
    /// RFC 9111 §5.2.1.5: no part of any response to this request may be stored, so no
    /// revalidation starts for it (it would be sent with its fields, its `no-store` among
    /// them, and its answer stored or freshened into the store for every other client).
    no_store: bool,
}

/// RFC 5861 §3: answers with the stale `f` at once and revalidates it in the background (one
/// revalidation per key: none starts while a fetch of the key is in flight).
#[allow(clippy::too_many_arguments)]
async fn stale_while_revalidate<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group_idx: usize,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    keys: &Keys<'_>,
    f: Found,
    a: StaleAnswer,
) -> Outcome<'c> {
    w.cache.count(|s| {
        s.stale_hits += 1;
        if a.collapsed {
            s.coalesced += 1;
        }
    });
    if !a.no_store {
        revalidate_later(w, cfg, p, group_idx, c, ctx, keys, &f);
    }
    let mut s = Status::hit(p, &f.obj, a.now);
    s.collapsed = a.collapsed;
    s.detail = Some("stale-while-revalidate");
    answer(w, &cfg.via, route, c, ctx, &f.obj, a.now, &s).await
}

/// Every case of a GET or HEAD but the usual miss (see [`first_look`], whose `look` it goes on
/// from: what the lookup under `keys` found at `now`, and whether any variant is stored).
#[allow(clippy::too_many_arguments)]
async fn cached<'c, 'k, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group_idx: usize,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    keys: &'k Keys<'k>,
    req: &Directives,
    authorized: bool,
    look: (Option<Hit<'k>>, bool, u64),
) -> Outcome<'c> {
    let group = &cfg.upstreams[group_idx];
    let cache = &w.cache;
    let (hit, any, now) = look;
    let mut fwd = if any { "vary-miss" } else { "uri-miss" };
    if let Some(f) = &hit {
        match usable(&f.obj, req, now) {
            // (`run` answers these itself, without this future.)
            Use::Fresh | Use::StaleOk => {
                cache.count(|s| s.hits += 1);
                let s = Status::hit(p, &f.obj, now);
                return answer(w, &cfg.via, route, c, ctx, &f.obj, now, &s).await;
            }
            Use::StaleRevalidate => {
                let f = Found {
                    obj: f.obj.clone(),
                    key: f.key.to_vec(),
                };
                let a = StaleAnswer {
                    now,
                    collapsed: false,
                    no_store: req.no_store,
                };
                return stale_while_revalidate(w, cfg, route, p, group_idx, c, ctx, keys, f, a)
                    .await;
            }
            Use::Validate => fwd = if req.no_cache { "request" } else { "stale" },
        }
    }
    let found = hit.map(Hit::found);
    if req.only_if_cached {
        // §5.2.1.7: nothing usable is stored.
        let mut s = Status::new(p, fwd);
        s.detail = Some("only-if-cached");
        return gateway_answer(w, c, ctx, 504, &s).await;
    }
    cache.count(|s| s.misses += 1);
    if ctx.head.method == Method::Head {
        // HEAD misses go through; only GET responses are stored, but a HEAD answer updates
        // or invalidates the stored GET (§4.3.5). With `[cache.redis]` the stored GET may be
        // another worker's or host's: it answers the HEAD when usable, and is what the HEAD's
        // answer updates otherwise.
        let mut found = found;
        let mut others = false;
        let shared = from_shared(
            w,
            keys,
            &sent(cfg, route, c, ctx),
            req,
            p,
            found.as_ref(),
            &mut others,
        )
        .await;
        if others && same_str(fwd, "uri-miss") {
            fwd = "vary-miss";
        }
        if let Some((f, u)) = shared {
            if matches!(u, Use::Fresh | Use::StaleOk) {
                cache.count(|s| s.hits += 1);
                let now = now_secs();
                let mut s = Status::hit(p, &f.obj, now);
                s.detail = Some("redis");
                return answer(w, &cfg.via, route, c, ctx, &f.obj, now, &s).await;
            }
            fwd = if req.no_cache { "request" } else { "stale" };
            found = Some(f);
        }
        let mut s = Status::new(p, fwd);
        // The purges applied before the HEAD is sent: one applied since (a POST's invalidation
        // while it was out) leaves the stored GET as it is (§4.4), not freshened back.
        let mode = Fetch::Head(found, cache.purges(), req.no_store);
        return fetch(w, cfg, route, p, group, c, ctx, mode, &mut s).await;
    }
    // Coalescing: one fetch per key on this worker; the others wait for it (no polling), up
    // to `coalesce_timeout`, then go alone. A failed fetch lets one waiter take over.
    // When this request began to wait (the first flight it finds).
    let mut started: Option<Instant> = None;
    let mut collapsed = false;
    let mut guard: Option<FlightGuard> = None;
    let mut found = found;
    for _ in 0..MAX_COALESCE_ROUNDS {
        let flight = match cache.join_or_begin_flight(keys.shared_key()) {
            Ok(flight) => flight,
            Err(g) => {
                guard = g;
                break;
            }
        };
        // Woken when the head is known, as bytes arrive and at the end: a plain GET that the
        // response suits is answered as it arrives; others wait for the end.
        let mut alone = false;
        while flight.end.get() == FlightEnd::Pending {
            if flight.cut.get() {
                // Outgrew `max_object_bytes`: not stored, and no waiter starts on it any more;
                // this one has sent nothing yet and goes upstream itself.
                alone = true;
                break;
            }
            let stream = flight.stream.borrow().clone();
            if let Some(st) = stream.filter(|st| streamable(&sent(cfg, route, c, ctx), req, st)) {
                cache.count(|s| {
                    s.hits += 1;
                    s.coalesced += 1
                });
                let mut s = Status::new(p, fwd);
                s.fwd_status = st.status;
                s.collapsed = true;
                return stream_from(w, &cfg.via, route, c, ctx, &flight, &st, &s).await;
            }
            let since = *started.get_or_insert_with(Instant::now);
            let left = p.coalesce_timeout.saturating_sub(since.elapsed());
            if left.is_zero()
                || monoio::time::timeout(left, flight.done.notified())
                    .await
                    .is_err()
            {
                alone = true;
                break;
            }
        }
        if alone {
            break;
        }
        match flight.end.get() {
            FlightEnd::Stored => {
                collapsed = true;
                let now = now_secs();
                let (f, _) = keys.lookup(cache, &sent(cfg, route, c, ctx));
                if let Some(f) = f {
                    match usable(&f.obj, req, now) {
                        Use::Fresh | Use::StaleOk => {
                            cache.count(|s| {
                                s.hits += 1;
                                s.coalesced += 1
                            });
                            let mut s = Status::hit(p, &f.obj, now);
                            s.collapsed = true;
                            return answer(w, &cfg.via, route, c, ctx, &f.obj, now, &s).await;
                        }
                        // RFC 5861 §3 for a waiter too: the flight stored an entry that is
                        // already stale, within its window (one found in Redis, whose
                        // revalidation now holds the key's flight): answered at once, not
                        // after that revalidation.
                        Use::StaleRevalidate => {
                            let a = StaleAnswer {
                                now,
                                collapsed: true,
                                no_store: req.no_store,
                            };
                            let f = f.found();
                            return stale_while_revalidate(
                                w, cfg, route, p, group_idx, c, ctx, keys, f, a,
                            )
                            .await;
                        }
                        Use::Validate => found = Some(f.found()),
                    }
                }
            }
            FlightEnd::NotStorable => {
                collapsed = true;
                break;
            }
            FlightEnd::Failed | FlightEnd::Pending => {}
        }
    }
    // The Redis layer: an entry there answers, or is validated instead of fetched whole (always
    // validated for a request with `no-cache`, §5.2.1.4, which still saves the body's transfer
    // when it has not changed). Without a layer there is no future to build and poll.
    let mut others = false;
    let shared = match cache.shared() {
        Some(_) => {
            let sent = &sent(cfg, route, c, ctx);
            from_shared(w, keys, sent, req, p, found.as_ref(), &mut others).await
        }
        None => None,
    };
    // Redis holds the key, but no variant this request selects (RFC 9211 §2.2).
    if others && same_str(fwd, "uri-miss") {
        fwd = "vary-miss";
    }
    if let Some((f, u)) = shared {
        let now = now_secs();
        match u {
            Use::Fresh | Use::StaleOk => {
                if let Some(g) = guard {
                    g.finish(FlightEnd::Stored);
                }
                cache.count(|s| s.hits += 1);
                let mut s = Status::hit(p, &f.obj, now);
                s.collapsed = collapsed;
                s.detail = Some("redis");
                return answer(w, &cfg.via, route, c, ctx, &f.obj, now, &s).await;
            }
            Use::StaleRevalidate => {
                // RFC 5861 §3, as for a local entry: answered at once and revalidated in the
                // background. This request's flight ends first (the entry is in the store
                // now), so that the revalidation can hold the key's flight.
                if let Some(g) = guard {
                    g.finish(FlightEnd::Stored);
                }
                let a = StaleAnswer {
                    now,
                    collapsed,
                    no_store: req.no_store,
                };
                return stale_while_revalidate(w, cfg, route, p, group_idx, c, ctx, keys, f, a)
                    .await;
            }
            Use::Validate => {
                fwd = if req.no_cache { "request" } else { "stale" };
                found = Some(f);
            }
        }
    }
    let mut s = Status::new(p, fwd);
    s.collapsed = collapsed;
    let stale = found.filter(|f| f.obj.status == 200 || f.obj.etag().is_some());
    fetch(
        w,
        cfg,
        route,
        p,
        group,
        c,
        ctx,
        Fetch::Fill {
            keys,
            stale,
            guard,
            req,
            authorized,
            request_time: now_secs(),
        },
        &mut s,
    )
    .await
}

/// What a trip upstream is for (one per request, held in its future). The request's keys and
/// directives are lent (the caller holds them across the fetch), not moved into the future.
#[allow(clippy::large_enum_variant)]
enum Fetch<'k> {
    /// Nothing to store (bypass).
    Pass,
    /// A HEAD: nothing stored, but its 200 freshens or invalidates the stored GET (§4.3.5);
    /// with the worker's purge count before it went ([`WorkerCache::purges`]), and whether
    /// the request said `no-store` (then it only invalidates: §5.2.1.5).
    Head(Option<Found>, u64, bool),
    /// An unsafe method: invalidate this URL on a non-error answer (§4.4); `true`: the
    /// origin reads the target under the other scheme ([`scheme_split`]), whose URLs go too.
    Invalidate(Vec<u8>, bool),
    /// A GET that may be stored; `stale`: what is stored, validated with its validators.
    Fill {
        keys: &'k Keys<'k>,
        stale: Option<Found>,
        guard: Option<FlightGuard>,
        req: &'k Directives,
        /// Whether the request has `Authorization` (§3.5), read with `req`.
        authorized: bool,
        /// The clock when the store was looked in, just before the fetch: its request time
        /// (RFC 9111 §4.2.3). Read earlier than at the request's send, it can only make the
        /// stored response's age larger (`response_delay` grows), the safe side; and it
        /// saves a reading of the clock on each miss.
        request_time: u64,
    },
}

/// The request head with the client's validators and range replaced by the stored
/// response's validators (RFC 9111 §4.3.1). `None` when the stored response has none, or
/// when it cannot be built within limits.
fn conditional_head(
    orig: &RequestHead,
    o: &Object,
    limits: &crate::http::request::Limits,
    head: RequestHead,
) -> Option<RequestHead> {
    let etag = o.etag();
    let lm = o.last_modified();
    if etag.is_none() && lm.is_none() {
        return None;
    }
    revalidation_head(orig, etag, lm, limits, head)
}

/// A GET of `orig`'s target with its fields but its own conditionals and `Range`, and with
/// these validators: what a revalidation sends, conditional or (none given) for the whole
/// response again, whatever the method of the request that started it (a HEAD's answer has
/// no body to store, RFC 9110 §9.3.2).
fn revalidation_head(
    orig: &RequestHead,
    etag: Option<&[u8]>,
    lm: Option<&[u8]>,
    limits: &crate::http::request::Limits,
    head: RequestHead,
) -> Option<RequestHead> {
    let dropped = [
        &b"if-none-match"[..],
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
    ];
    let add = |raw: &mut BytesMut| {
        if let Some(e) = etag {
            put_header(raw, b"if-none-match", e);
        }
        if let Some(l) = lm {
            put_header(raw, b"if-modified-since", l);
        }
    };
    upstream_get(orig, &dropped, 128, add, limits, head)
}

/// A GET of `orig`'s target with its fields but those named in `dropped` (lower case), then
/// the lines `add` writes (of about `more` bytes), parsed within `limits` into `head`: what the
/// cache sends upstream in a client's stead ([`revalidation_head`], [`rest_head`]). `None`
/// when it cannot be built within limits.
fn upstream_get(
    orig: &RequestHead,
    dropped: &[&[u8]],
    more: usize,
    add: impl FnOnce(&mut BytesMut),
    limits: &crate::http::request::Limits,
    mut head: RequestHead,
) -> Option<RequestHead> {
    let mut raw = BytesMut::with_capacity(orig.raw.len() + more);
    raw.put_slice(b"GET ");
    raw.put_slice(orig.bytes(orig.target));
    raw.put_slice(b" HTTP/1.1\r\n");
    for h in &orig.headers {
        let name = orig.bytes(h.name);
        if !dropped.iter().any(|d| name.eq_ignore_ascii_case(d)) {
            put_header(&mut raw, name, orig.bytes(h.value));
        }
    }
    add(&mut raw);
    raw.put_slice(b"\r\n");
    match parse_request(&raw, limits, &mut head) {
        Ok(Some(n)) if n == raw.len() => {
            head.raw = raw.freeze();
            Some(head)
        }
        _ => None,
    }
}

/// The response's header fields, copied (they must not pin the upstream read buffer): the
/// lines of one copy of the head, without those `Connection` lists (RFC 9110 §7.6.1).
fn copy_fields(resp: &ResponseHead) -> Fields {
    let listed = ConnectionOptions::collect(&resp.raw, &resp.headers, resp.connection_options);
    let mut spans = Vec::with_capacity(resp.headers.len() + 1);
    for h in &resp.headers {
        let n = resp.bytes(h.name);
        if !(resp.connection_options && listed.lists(n)) {
            spans.push(*h);
        }
    }
    // A line's span in the head is its span in the head's copy.
    Fields::from_block(Bytes::copy_from_slice(&resp.raw), spans)
}

/// A response analysed for storing (RFC 9111 §3): the fields to keep and its timing, or why
/// it is not stored.
pub(crate) struct Storable {
    pub fields: Fields,
    pub t: Timing,
    pub public: bool,
    pub vary: Vec<Box<[u8]>>,
    /// A `Surrogate-Key` field was seen (its tags are read only then).
    pub tagged: bool,
    /// From [`analyze_response`]: the request's URL, and room for the body (the body itself
    /// in [`analyze_whole`]), in the allocation that holds the head's copy (empty from
    /// [`analyze`]).
    pub url: Bytes,
    pub body: BytesMut,
}

pub(crate) fn analyze(
    p: &RoutePolicy,
    status: u16,
    mut fields: Fields,
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
) -> Result<Storable, &'static str> {
    let (d, targeted) = p.response_directives(fields.view());
    screen(status, &d, req_authorized)?;
    let seen = Seen::of(fields.view());
    let (t, vary) = freshness(
        p,
        status,
        fields.view(),
        &seen,
        &d,
        targeted,
        request_time,
        response_time,
    )?;
    let had_date = seen.has(FieldName::Date);
    let tagged = seen.has(FieldName::SurrogateKey);
    fields.retain(|n, _| !dropped(p, &d, true, n));
    if !has_date(fields.view(), &d, had_date) {
        // A block of its own with the Date added (rare: a response without one).
        let date = crate::date::http_date(response_time);
        let with_date = fields.iter().chain(std::iter::once((DATE, &date[..])));
        fields = Fields::from_pairs(with_date).ok_or("too-large")?;
    }
    Ok(Storable {
        fields,
        t,
        public: d.public,
        vary,
        tagged,
        url: Bytes::new(),
        body: BytesMut::new(),
    })
}

/// [`analyze`] for an upstream's response head: a response that is never stored (its status,
/// `no-store`, `private`, §3.5) is known from the head as it was read, before anything is
/// copied; the fields of one that may be are classified once each ([`policy::field_name`]) in
/// one pass that notes what the freshness calculation reads and keeps the parser's spans of
/// the lines stored. What the stored object keeps of the response takes one allocation: the
/// head's copy (the stored fields' block, [`Fields`]; with a Date after it when the response
/// has none), the URL of `req` and `body_room` bytes for the body ([`Storable::url`],
/// [`Storable::body`]; [`analyze_whole`] copies a body that came whole with the head there,
/// once the response is known to be stored). That allocation and the spans' vector are the
/// cache's ([`WorkerCache::object_buf`], [`WorkerCache::field_vec`]). It decides what [`analyze`]
/// decides of [`copy_fields`] of the same head (a test compares the two on arbitrary heads).
#[allow(clippy::too_many_arguments)]
fn analyze_response(
    p: &RoutePolicy,
    resp: &ResponseHead,
    req: &RequestHead,
    cache: &WorkerCache,
    body_room: usize,
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
) -> Result<Storable, &'static str> {
    analyze_with(
        p,
        resp,
        req,
        cache,
        body_room,
        None,
        false,
        req_authorized,
        request_time,
        response_time,
        |s| s,
    )
}

/// [`analyze_response`] of a 206 that [`piece_range`] found storable as a piece (RFC 9111
/// §3.3), its body whole (`Ok`) or `Err(room)` to come: screened as the 200 it is part of,
/// its fields kept with its `Content-Range`.
#[allow(clippy::too_many_arguments)]
#[cold]
#[inline(never)]
fn analyze_piece(
    p: &RoutePolicy,
    resp: &ResponseHead,
    req: &RequestHead,
    cache: &WorkerCache,
    body: Result<&[u8], usize>,
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
) -> Result<Storable, &'static str> {
    let (room, whole) = match body {
        Ok(b) => (b.len(), Some(b)),
        Err(room) => (room, None),
    };
    analyze_with(
        p,
        resp,
        req,
        cache,
        room,
        whole,
        true,
        req_authorized,
        request_time,
        response_time,
        |s| s,
    )
}

/// [`analyze_response`] of a response whose body came whole with its head (`body`), made
/// into the object that stores it (in the one allocation, after the head's copy and the URL:
/// see [`whole_object`]), with whether the response is public. No [`Storable`] is made and
/// taken apart: the parts go where the object keeps them.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn analyze_whole(
    p: &RoutePolicy,
    resp: &ResponseHead,
    sent: &Sent<'_>,
    cache: &WorkerCache,
    body: &[u8],
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
) -> Result<(Rc<Object>, bool), &'static str> {
    analyze_with(
        p,
        resp,
        sent.head,
        cache,
        body.len(),
        Some(body),
        false,
        req_authorized,
        request_time,
        response_time,
        #[inline(always)]
        |s| {
            let public = s.public;
            (whole_object(cache, s, resp, sent), public)
        },
    )
}

/// The analysis of [`analyze_response`], what passes it given to `finish`; `whole_body`: the
/// body, when it came whole with the head (copied after the URL, in [`Storable::body`]).
/// `piece`: the response is a 206 to store as a piece ([`analyze_piece`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn analyze_with<R>(
    p: &RoutePolicy,
    resp: &ResponseHead,
    req: &RequestHead,
    cache: &WorkerCache,
    body_room: usize,
    whole_body: Option<&[u8]>,
    piece: bool,
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
    finish: impl FnOnce(Storable) -> R,
) -> Result<R, &'static str> {
    // A `Connection` field that lists options (rare) goes out of line: the usual head's lines
    // are then read without a look for them.
    if resp.connection_options {
        return analyze_listed(
            p,
            resp,
            req,
            cache,
            body_room,
            whole_body,
            piece,
            req_authorized,
            request_time,
            response_time,
            finish,
        );
    }
    analyze_lines::<false, R>(
        p,
        resp,
        req,
        cache,
        body_room,
        whole_body,
        piece,
        req_authorized,
        request_time,
        response_time,
        finish,
    )
}

/// [`analyze_with`] of a response whose `Connection` field lists options (rare).
#[allow(clippy::too_many_arguments)]
#[cold]
#[inline(never)]
fn analyze_listed<R>(
    p: &RoutePolicy,
    resp: &ResponseHead,
    req: &RequestHead,
    cache: &WorkerCache,
    body_room: usize,
    whole_body: Option<&[u8]>,
    piece: bool,
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
    finish: impl FnOnce(Storable) -> R,
) -> Result<R, &'static str> {
    analyze_lines::<true, R>(
        p,
        resp,
        req,
        cache,
        body_room,
        whole_body,
        piece,
        req_authorized,
        request_time,
        response_time,
        finish,
    )
}

/// [`analyze_with`]'s work; `LISTED`: the response's `Connection` field lists options
/// (its `connection_options`), whose lines are skipped.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn analyze_lines<const LISTED: bool, R>(
    p: &RoutePolicy,
    resp: &ResponseHead,
    req: &RequestHead,
    cache: &WorkerCache,
    body_room: usize,
    whole_body: Option<&[u8]>,
    piece: bool,
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
    finish: impl FnOnce(Storable) -> R,
) -> Result<R, &'static str> {
    // The lines listed in `Connection` are not the response's own (RFC 9110 §7.6.1): both
    // passes skip them, as `copy_fields` does.
    // (Collected only when there are any: most responses have none.)
    let listed = LISTED.then(|| ConnectionOptions::collect(&resp.raw, &resp.headers, true));
    let hidden = |n: &[u8]| listed.as_ref().is_some_and(|l| l.lists(n));
    // First pass: the directives, from the Cache-Control lines, and whether a targeted field
    // (RFC 9213) may govern instead (then they are read as `analyze` reads them: rare).
    // A line's name is looked at only when its length is that of one of these names (the
    // targeted ones as bits of their lengths modulo 64: a name of another length that shares
    // a bit is compared, and found not to be one).
    let targeted_lens = p.targeted_lens;
    debug_assert_eq!(targeted_lens, policy::length_bits(&p.targeted));
    // Both tests behind one: whether a line's length is that of any of these names.
    let looked_at = targeted_lens | 1 << CACHE_CONTROL.len();
    let mut d = Directives::default();
    let mut any_targeted = false;
    for h in &resp.headers {
        let len = h.name.len();
        if looked_at >> (len % 64) & 1 == 0 {
            continue;
        }
        if len == CACHE_CONTROL.len() {
            let n = resp.bytes(h.name);
            if policy::is_name(n, CACHE_CONTROL) && !hidden(n) {
                d.add(resp.bytes(h.value));
            }
        }
        // A line of Cache-Control's length is a targeted one's only when some targeted name
        // has that length too (a test of a bit known before the loop; the other lines here
        // have a targeted one's length).
        if len != CACHE_CONTROL.len() || targeted_lens >> CACHE_CONTROL.len() & 1 == 1 {
            // Targeted names are lower case (`RoutePolicy::compile`).
            let n = resp.bytes(h.name);
            any_targeted |= p.targeted.iter().any(|t| policy::is_name(n, t));
        }
    }
    // Borrowed, not moved (a `Directives` is some 100 bytes).
    let by_targeted;
    let (d, targeted) = if any_targeted {
        by_targeted = targeted_directives(p, resp, listed.as_ref());
        (&by_targeted.0, by_targeted.1)
    } else {
        (&d, false)
    };
    if !screened_usual(resp.status, d, req_authorized) {
        // A piece (a 206 its caller checked, §3.3) is screened as the 200 it is part of.
        let status = if piece { 200 } else { resp.status };
        screen(status, d, req_authorized)?;
    }
    // Second pass: what the freshness calculation reads (`Seen`), and the lines stored, as
    // the parser's spans of them in the head (they are spans of its copy too).
    // Never stored (§3.1): hop-by-hop and framing fields, Age (read, §4.2.3), Set-Cookie
    // unless the route stores it. An upstream's Cache-Status is kept: answers from the store
    // carry it before this cache's member (RFC 9211 §2).
    let store_cookies = p.set_cookie == super::config::SetCookieMode::Store;
    let kept = KEPT_KINDS | u16::from(store_cookies) << FieldName::SetCookie as u16;
    let mut spans = cache.field_vec();
    // Sized for every line at once (pushing would start small and grow).
    spans.reserve(resp.headers.len() + 1);
    // Each line noted the same way whatever its kind (a branch per kind spread the loop over
    // more code lines than the kinds it tells apart).
    let mut seen = Seen::new(&resp.raw);
    for h in &resp.headers {
        let n = resp.bytes(h.name);
        if hidden(n) {
            continue;
        }
        let kind = policy::field_name(n);
        seen.note(kind, h);
        if kept >> kind as u16 & 1 == 1 {
            spans.push(*h);
        }
    }
    // The usual response's lifetime in line; any other's out of line.
    let (lifetime, age_value, vary) = match usual_lifetime(d, &seen) {
        Some(lifetime) => (lifetime, 0, Vec::new()),
        None => lifetime_of(
            p,
            resp.status,
            FieldsRef::new(&resp.raw, &spans),
            &seen,
            d,
            targeted,
            response_time,
        )?,
    };
    let t = timing(
        p,
        d,
        &seen,
        lifetime,
        age_value,
        request_time,
        response_time,
    )?;
    let had_date = seen.has(FieldName::Date);
    let tagged = seen.has(FieldName::SurrogateKey);
    // Only `private="..."` and `no-cache="..."` are left to drop.
    if d.names_fields() {
        drop_named_lines(p, d, resp, &mut spans);
    }
    // A response left without a Date gets one (RFC 9110 §6.6.1), written after the head's
    // copy, in the same block.
    let date = if has_date(FieldsRef::new(&resp.raw, &spans), d, had_date) {
        None
    } else {
        // (Rare: marked cold, as are the arms below that add it.)
        std::hint::cold_path();
        Some(crate::date::http_date(response_time))
    };
    // The URL as the route's key reads it, when that is not the URL as sent (`keyed_url`).
    let keyed = if !p.ignore_host && matches!(p.query, super::QueryMode::All) {
        None
    } else {
        std::hint::cold_path();
        let mut u = Vec::new();
        url_of(req, &mut u);
        super::keyed_url(p, &u)
    };
    let url = match &keyed {
        None => super::UrlParts::of(req),
        Some(k) => super::UrlParts::of_url(k),
    };
    let head_len = resp.raw.len();
    let block_len = match &date {
        Some(date) => {
            std::hint::cold_path();
            let value_at = head_len.saturating_add(DATE.len());
            let (Some(name), Some(value)) = (
                super::fields::span(head_len, DATE.len()),
                super::fields::span(value_at, date.len()),
            ) else {
                return Err("too-large");
            };
            spans.push(HeaderSpan { name, value });
            value_at.saturating_add(date.len())
        }
        None => head_len,
    };
    let mut buf = cache.object_buf(
        block_len
            .saturating_add(url.out_len())
            .saturating_add(body_room),
    );
    buf.extend_from_slice(&resp.raw);
    if let Some(date) = &date {
        std::hint::cold_path();
        buf.extend_from_slice(DATE);
        buf.extend_from_slice(date);
    }
    url.put(&mut buf);
    let url_end = buf.len();
    if let Some(b) = whole_body {
        buf.extend_from_slice(b);
    }
    // The head (and a Date) and the URL, frozen; `buf` keeps the rest of the allocation: the
    // body given whole, or room for it. `block` keeps the fields' bytes (split, not sliced
    // twice: one reference for the two parts).
    let mut block = buf.split_to(url_end).freeze();
    let url = block.split_off(block_len);
    Ok(finish(Storable {
        fields: Fields::from_block(block, spans),
        t,
        public: d.public,
        vary,
        tagged,
        url,
        body: buf,
    }))
}

/// The directives of `resp` as [`RoutePolicy::directives_by`] reads them (a targeted field's
/// when one is valid, RFC 9213 §2.2), without the lines `listed` in `Connection`. Rare (a
/// response with a targeted field): out of [`analyze_response`]'s way.
#[cold]
#[inline(never)]
fn targeted_directives(
    p: &RoutePolicy,
    resp: &ResponseHead,
    listed: Option<&ConnectionOptions<'_>>,
) -> (Directives, bool) {
    p.directives_by(|name, each| {
        for h in &resp.headers {
            let n = resp.bytes(h.name);
            if policy::eq_ignore_case(n, name) && !listed.is_some_and(|l| l.lists(n)) {
                each(resp.bytes(h.value));
            }
        }
    })
}

/// Leaves out of `spans` (lines of `resp`) those `private="..."` or `no-cache="..."` names
/// ([`dropped`]). Rare: out of [`analyze_response`]'s way.
#[cold]
#[inline(never)]
fn drop_named_lines(
    p: &RoutePolicy,
    d: &Directives,
    resp: &ResponseHead,
    spans: &mut Vec<HeaderSpan>,
) {
    spans.retain(|s| !dropped(p, d, false, resp.bytes(s.name)));
}

const CACHE_STATUS: &[u8] = b"cache-status";

/// Takes out of an upstream's `Cache-Status` lines the members that bear this cache's name,
/// before the response is stored or relayed: a member names the cache that wrote it (RFC 9211
/// §2), and one named as ringway, kept before ringway's own, would let an origin forge this
/// cache's status (a `hit` for a miss, a `ttl`). A line left with no member goes. Most
/// responses have no such line: one pass over the names' lengths, no allocation.
#[inline]
fn drop_forged_members(p: &RoutePolicy, resp: &mut ResponseHead) {
    let name = &p.name[..];
    let forged = resp.headers.iter().any(|h| {
        h.name.len() == CACHE_STATUS.len()
            && policy::is_name(resp.bytes(h.name), CACHE_STATUS)
            && !name.is_empty()
            && resp.bytes(h.value).windows(name.len()).any(|w| w == name)
    });
    if forged {
        rewrite_status_lines(name, resp);
    }
}

/// [`drop_forged_members`]'s work, for a head with a line that may hold such a member: a line
/// that loses members gets its new value after a copy of the head (its span moved there); one
/// that loses them all is dropped.
#[cold]
#[inline(never)]
fn rewrite_status_lines(name: &[u8], resp: &mut ResponseHead) {
    let mut raw = BytesMut::from(&resp.raw[..]);
    let mut i = 0;
    while i < resp.headers.len() {
        let h = resp.headers[i];
        let rest = policy::is_name(resp.bytes(h.name), CACHE_STATUS)
            .then(|| policy::without_members(resp.bytes(h.value), name))
            .flatten();
        if let Some(v) = rest {
            match super::fields::span(raw.len(), v.len()).filter(|_| !v.is_empty()) {
                Some(at) => {
                    raw.extend_from_slice(&v);
                    resp.headers[i].value = at;
                }
                None => {
                    resp.headers.remove(i);
                    continue;
                }
            }
        }
        i += 1;
    }
    resp.raw = raw.freeze();
}

/// [`drop_forged_members`] for the fields of an entry read from Redis: a hostile server, or a
/// peer that writes there, could plant members bearing this cache's name (RFC 9211 §2), which
/// every answer from the entry would replay before ringway's own. Run once, as the entry is
/// loaded into the worker's store, not on each hit. Most entries have no such member: one
/// pass over the names, no allocation.
fn drop_forged_stored(p: &RoutePolicy, fields: &mut Fields) {
    let name = &p.name[..];
    let is_status = |n: &[u8]| n.len() == CACHE_STATUS.len() && policy::is_name(n, CACHE_STATUS);
    let forged = !name.is_empty()
        && fields
            .iter()
            .any(|(n, v)| is_status(n) && v.windows(name.len()).any(|w| w == name));
    if !forged {
        return;
    }
    std::hint::cold_path();
    let kept: Vec<(&[u8], std::borrow::Cow<'_, [u8]>)> = fields
        .iter()
        .filter_map(|(n, v)| {
            let v = match is_status(n)
                .then(|| policy::without_members(v, name))
                .flatten()
            {
                Some(rest) if rest.is_empty() => return None,
                Some(rest) => rest.into(),
                None => v.into(),
            };
            Some((n, v))
        })
        .collect();
    match Fields::from_pairs(kept.iter().map(|(n, v)| (*n, &v[..]))) {
        Some(f) => *fields = f,
        // Past what one block holds: no `Cache-Status` line at all is kept.
        None => fields.retain(|n, _| !is_status(n)),
    }
}

/// The name of the Date field this cache adds to a response stored without one.
const DATE: &[u8] = b"date";

const CACHE_CONTROL: &[u8] = b"cache-control";

/// The kinds of field ([`FieldName`], as bits) that a stored response keeps (§3.1): not the
/// hop-by-hop and framing fields, Age (read, §4.2.3), nor Set-Cookie, which a route that
/// stores it adds. The upstream's Cache-Status members are kept (RFC 9211 §2: a cache
/// preserves them and appends its own, which answers from the store write after them).
const KEPT_KINDS: u16 = {
    use FieldName::*;
    let kinds = [
        Other,
        CacheControl,
        Date,
        Expires,
        LastModified,
        ETag,
        Vary,
        SurrogateKey,
        CacheStatus,
    ];
    let mut bits = 0;
    let mut i = 0;
    while i < kinds.len() {
        bits |= 1 << kinds[i] as u16;
        i += 1;
    }
    bits
};

/// Whether [`screen`] passes a response without a look at its rules: the usual response to
/// the usual request (a status stored by default but 206, none of `must-understand`,
/// `no-store` or `private`, no `Authorization`). One branch on the stored miss's path.
#[inline(always)]
fn screened_usual(status: u16, d: &Directives, req_authorized: bool) -> bool {
    (200..600).contains(&status)
        & (status != 206)
        & !answers_the_request(status)
        & !(d.must_understand | d.no_store | d.private | req_authorized)
}

/// Statuses that answer the request itself, not what the URL holds; stored under the URL (with
/// an origin's blanket freshness, such as a `max-age` added to every answer), one client's
/// request would answer every later request there (cache-poisoned denial of service). None is
/// stored (RFC 9111 §3 allows, never requires, storing):
/// - 304, 412, 416: its conditionals and its `Range` (RFC 9110 §15.4.5, §15.5.13, §15.5.17),
///   which the cache answers itself from what it stores (RFC 9111 §4.3.2; a 304 only
///   updates, §4.3.4);
/// - 400, 408, 413, 417, 431: its syntax, its pace, its content, its `Expect`, the size of its
///   header (RFC 9110 §15.5.1, §15.5.9, §15.5.14, §15.5.18; RFC 6585 §5);
/// - 429: its client's rate (RFC 6585 §4).
#[inline(always)]
fn answers_the_request(status: u16) -> bool {
    matches!(status, 304 | 400 | 408 | 412 | 413 | 416 | 417 | 429 | 431)
}

/// What the status and the directives alone rule out (§3, §3.5), in this order. (The stored
/// miss's path tests [`screened_usual`] first: this is called for the other responses.)
#[cold]
#[inline(never)]
fn screen(status: u16, d: &Directives, req_authorized: bool) -> Result<(), &'static str> {
    if !(200..600).contains(&status) || status == 206 || answers_the_request(status) {
        return Err("status");
    }
    // (`understood` is looked up only under `must-understand`, rare.)
    if d.must_understand && !policy::understood(status) {
        return Err("must-understand");
    }
    if d.no_store && !(d.must_understand && policy::understood(status)) {
        return Err(NO_STORE);
    }
    if d.private {
        return Err("private");
    }
    // §3.5: a shared cache stores a response to an authorized request only when told to.
    if req_authorized && !(d.public || d.s_maxage.is_some() || d.must_revalidate) {
        return Err("authorization");
    }
    Ok(())
}

/// The lower-case names a response varies on (§4.1).
type VaryNames = Vec<Box<[u8]>>;

/// The freshness lifetime of the usual response, when it is one: an explicit `s-maxage` or
/// `max-age` (§4.2.1; Expires is not looked at), and no Set-Cookie, Vary or Age (so no Age to
/// add, §4.2.3). [`lifetime_of`] finds the same for any other response, out of line.
#[inline(always)]
fn usual_lifetime(d: &Directives, seen: &Seen<'_>) -> Option<u64> {
    use FieldName::*;
    let lifetime = d.s_maxage.or(d.max_age)?;
    if seen.has(SetCookie) | seen.has(Vary) | seen.has(Age) {
        return None;
    }
    Some(lifetime)
}

/// What follows [`screen`] once it passed: whether the fields allow storing, the response's
/// freshness (§4.2) and the names it varies on (§4.1). `seen`: what [`Seen::of`] finds in
/// `fields` (Age among them, though it is not stored). What [`analyze`]
/// calls: a test compares it with [`analyze_response`], which computes the usual response's
/// lifetime in line ([`usual_lifetime`]).
#[allow(clippy::too_many_arguments)]
fn freshness(
    p: &RoutePolicy,
    status: u16,
    fields: FieldsRef<'_>,
    seen: &Seen<'_>,
    d: &Directives,
    targeted: bool,
    request_time: u64,
    response_time: u64,
) -> Result<(Timing, VaryNames), &'static str> {
    let (lifetime, age_value, vary) =
        lifetime_of(p, status, fields, seen, d, targeted, response_time)?;
    let t = timing(p, d, seen, lifetime, age_value, request_time, response_time)?;
    Ok((t, vary))
}

/// [`freshness`] up to the [`Timing`]: whether the fields allow storing, the response's
/// freshness lifetime (§4.2.1), its Age (§4.2.3) and the names it varies on (§4.1). Out of
/// line and cold: the stored miss's path computes the usual response's in line
/// ([`usual_lifetime`]).
#[cold]
#[inline(never)]
fn lifetime_of(
    p: &RoutePolicy,
    status: u16,
    fields: FieldsRef<'_>,
    seen: &Seen<'_>,
    d: &Directives,
    targeted: bool,
    response_time: u64,
) -> Result<(u64, u64, VaryNames), &'static str> {
    use FieldName::*;
    if seen.has(SetCookie) && p.set_cookie == super::config::SetCookieMode::Bypass {
        return Err("set-cookie");
    }
    let vary = if seen.has(Vary) {
        policy::vary_names(policy::fields(fields, b"vary")).ok_or("vary-star")?
    } else {
        Vec::new()
    };
    if vary.len() > MAX_VARY_FIELDS {
        return Err("vary-too-many");
    }
    let expires = if targeted { None } else { seen.value(Expires) };
    let explicit = d.s_maxage.is_some() || d.max_age.is_some() || expires.is_some();
    // Looked at only without an explicit lifetime.
    let heuristic = || p.heuristic && (policy::heuristic_status(status) || d.public);
    if !explicit && !d.public && !heuristic() {
        return Err("no-freshness");
    }
    // §4.2.1
    let lifetime = if let Some(s) = d.s_maxage {
        s
    } else if let Some(m) = d.max_age {
        m
    } else if let Some(e) = expires {
        // An invalid date means already expired (§5.3).
        let date = date_of(seen, response_time);
        policy::parse_http_date(e).map_or(0, |e| e.saturating_sub(date))
    } else if heuristic() {
        // §4.2.2: a fraction of the time since the last modification.
        let date = date_of(seen, response_time);
        seen.value(LastModified)
            .and_then(policy::parse_http_date)
            .map_or(0, |lm| (date.saturating_sub(lm) / 10).min(p.max_heuristic))
    } else {
        0
    };
    // §4.2.3
    // §5.1: a list-valued Age counts by its first member; an invalid one is ignored.
    let age_value = seen
        .value(Age)
        .and_then(|v| crate::http::list_items(v).next())
        .and_then(policy::delta_seconds)
        .unwrap_or(0);
    Ok((lifetime, age_value, vary))
}

/// The response's Date (§4.2.3's `date_value`), or the time it was received when it has none
/// or an invalid one.
#[inline(always)]
fn date_of(seen: &Seen<'_>, response_time: u64) -> u64 {
    seen.value(FieldName::Date)
        .and_then(policy::parse_http_date)
        .unwrap_or(response_time)
}

/// The [`Timing`] of a response given its freshness `lifetime` and `age_value` (§4.2.3), or
/// why it is not stored: stale on arrival, with nothing that would let it be used then.
#[inline(always)]
fn timing(
    p: &RoutePolicy,
    d: &Directives,
    seen: &Seen<'_>,
    lifetime: u64,
    age_value: u64,
    request_time: u64,
    response_time: u64,
) -> Result<Timing, &'static str> {
    let date = date_of(seen, response_time);
    let apparent_age = response_time.saturating_sub(date);
    let response_delay = response_time.saturating_sub(request_time);
    let corrected_age_value = age_value.saturating_add(response_delay);
    let t = Timing {
        response_time,
        initial_age: apparent_age.max(corrected_age_value),
        lifetime,
        swr: d.stale_while_revalidate.or(p.swr).unwrap_or(0),
        sie: d.stale_if_error.or(p.sie).unwrap_or(0),
        no_stale: d.must_revalidate || d.proxy_revalidate || d.s_maxage.is_some(),
        always_validate: d.no_cache,
    };
    let validators = seen.has(FieldName::ETag) || seen.has(FieldName::LastModified);
    if lifetime == 0 && !validators && t.swr == 0 && t.sie == 0 {
        std::hint::cold_path();
        return Err("stale-on-arrival");
    }
    Ok(t)
}

/// Whether a line named `n` of a response [`freshness`] accepted is left out of what is
/// stored: named by `private="..."` or `no-cache="..."` (§5.2.2.4, §5.2.2.7), or, when
/// `unfiltered`, one of the fields never stored (hop-by-hop and framing, Age,
/// Set-Cookie unless the route stores it), which [`analyze_response`] does not keep in the
/// first place.
fn dropped(p: &RoutePolicy, d: &Directives, unfiltered: bool, n: &[u8]) -> bool {
    (unfiltered
        && (policy::unstorable_field(n)
            || (p.set_cookie != super::config::SetCookieMode::Store
                && (n.eq_ignore_ascii_case(b"set-cookie")
                    || n.eq_ignore_ascii_case(b"set-cookie2")))))
        || d.private_fields().iter().any(|f| f.eq_ignore_ascii_case(n))
        || d.no_cache_fields()
            .iter()
            .any(|f| f.eq_ignore_ascii_case(n))
}

/// Whether the fields kept of a response hold a Date; `had_date`: the response had one. One
/// is added when none is left (RFC 9110 §6.6.1: the time it was received).
fn has_date(kept: FieldsRef<'_>, d: &Directives, had_date: bool) -> bool {
    // Of what was filtered out, only `private="date"` or `no-cache="date"` can be Date.
    if d.names_fields() {
        std::hint::cold_path();
        policy::field(kept, DATE).is_some()
    } else {
        had_date
    }
}

/// The fields [`freshness`] reads (the first value of each, as [`policy::field`] gives it):
/// the first line of each kind ([`FieldName`]) of a response's fields.
struct Seen<'a> {
    /// The bytes the lines' spans are of.
    block: &'a [u8],
    /// The first line of each kind, indexed by [`FieldName`] (Age among
    /// them, though neither is stored).
    first: [Option<&'a HeaderSpan>; FieldName::COUNT],
}

impl<'a> Seen<'a> {
    /// Nothing seen yet of lines in `block`.
    #[inline(always)]
    fn new(block: &'a [u8]) -> Seen<'a> {
        Seen {
            block,
            first: [None; FieldName::COUNT],
        }
    }

    /// Notes `line`, of `kind`, unless a line of its kind came before it.
    #[inline(always)]
    fn note(&mut self, kind: FieldName, line: &'a HeaderSpan) {
        self.first[kind as usize].get_or_insert(line);
    }

    /// Whether there is a line of `kind`.
    #[inline(always)]
    fn has(&self, kind: FieldName) -> bool {
        self.first[kind as usize].is_some()
    }

    /// The value of the first line of `kind`.
    #[inline(always)]
    fn value(&self, kind: FieldName) -> Option<&'a [u8]> {
        self.first[kind as usize].map(|h| super::fields::part(self.block, h.value))
    }

    /// What `fields` hold, found in one pass (by names compared here, apart from
    /// [`policy::field_name`], which [`analyze_response`] classifies by).
    fn of(fields: FieldsRef<'a>) -> Seen<'a> {
        use FieldName::*;
        let mut s = Seen::new(fields.block());
        for h in fields.spans() {
            let n = super::fields::part(s.block, h.name);
            let is = |name: &[u8]| policy::eq_ignore_case(n, name);
            let kind = match n.len() {
                3 if is(b"age") => Age,
                4 if is(b"date") => Date,
                4 if is(b"etag") => ETag,
                4 if is(b"vary") => Vary,
                7 if is(b"expires") => Expires,
                10 | 11 if is(b"set-cookie") || is(b"set-cookie2") => SetCookie,
                12 if is(b"cache-status") => CacheStatus,
                13 if is(b"last-modified") => LastModified,
                13 if is(b"surrogate-key") => SurrogateKey,
                _ => continue,
            };
            s.note(kind, h);
        }
        s
    }
}

/// The request's values of the fields a response varies on (lower-case names), as stored.
#[inline]
fn vary_values(names: &[Box<[u8]>], req: &Sent<'_>) -> Vec<(Box<[u8]>, Vec<u8>)> {
    // Most responses do not vary (checked where it is called: no call for them).
    if names.is_empty() {
        return Vec::new();
    }
    std::hint::cold_path();
    vary_values_of(names, req)
}

/// (The values as sent upstream: an identity header's are the gateway's, see [`Sent`].)
fn vary_values_of(names: &[Box<[u8]>], req: &Sent<'_>) -> Vec<(Box<[u8]>, Vec<u8>)> {
    names
        .iter()
        .map(|n| (n.clone(), req.vary_value(n)))
        .collect()
}

/// The request as it goes upstream, for Vary ([`Sent`]): its identity headers' values are
/// the ones the gateway sets (the route's, the auth stage's, the listener's mTLS subject).
#[inline(always)]
fn sent<'a, S>(
    cfg: &'a Snapshot,
    route: &'a Route,
    c: &'a Conn<S>,
    ctx: &'a RequestCtx<'_>,
) -> Sent<'a> {
    Sent::new(
        &ctx.head,
        &ctx.auth_headers,
        cert_of(cfg, c),
        super::Hop {
            route,
            peer_ip: c.peer.as_bytes(),
            request_id: ctx.id.as_bytes(),
            via: &cfg.via,
            port: c.info.port,
            trusted: c.info.trusted,
            https: c.info.tls,
            trace: &ctx.rec.trace,
            upstreams: &cfg.upstreams,
        },
    )
}

/// The mTLS subject header's name and value sent upstream, when the client has a verified
/// certificate.
#[inline(always)]
fn cert_of<'a, S>(cfg: &'a Snapshot, c: &'a Conn<S>) -> Option<(&'a [u8], &'a [u8])> {
    let subject = c.info.client_subject.as_deref()?;
    let name = cfg
        .listeners
        .get(c.info.listener)?
        .subject_header
        .as_deref()?;
    Some((name, subject))
}

/// The surrogate keys of an analysed response (read only when it has a `Surrogate-Key`).
#[inline]
fn tags_of(s: &Storable) -> Vec<Box<[u8]>> {
    if s.tagged {
        // (Rare: out of the usual object's code lines.)
        std::hint::cold_path();
        super::surrogate_keys(s.fields.view())
    } else {
        Vec::new()
    }
}

/// `vary`: the request's values of the fields named by `s.vary` ([`vary_values`]). (A fetched
/// response is built in place instead: see [`store`]; both give the same object, which a test
/// checks.)
fn make_object(
    s: Storable,
    status: u16,
    reason: Bytes,
    body: Bytes,
    url: Bytes,
    vary: Vec<(Box<[u8]>, Vec<u8>)>,
) -> Object {
    let tags = tags_of(&s);
    Object {
        status,
        reason,
        fields: s.fields,
        body,
        t: s.t,
        url,
        tags,
        vary,
        invalid: std::cell::Cell::new(false),
        born: std::cell::Cell::new(0),
    }
}

/// Whether a 304 selects the stored response `o` for update (RFC 9111 §4.3.4): a strong
/// entity tag must be the stored one by the strong comparison, a weak one must match it by the
/// weak comparison (RFC 9110 §8.8.3.2), and a stored response without one is not selected by
/// one. Without an entity tag, a `Last-Modified` (a weak validator) must be the stored one.
/// A 304 with neither leaves the selection to the validator the cache sent (it asked about
/// `o`).
fn selected_by_304(fields: &Fields, o: &Object) -> bool {
    match (policy::field(fields, b"etag"), o.etag()) {
        (Some(new), Some(old)) if new.starts_with(b"W/") => policy::weak_match(new, old),
        (Some(new), Some(old)) => policy::strong_match(new, old),
        (Some(_), None) => false,
        (None, _) => match (policy::field(fields, b"last-modified"), o.last_modified()) {
            (Some(new), Some(old)) => {
                let date = |v: &[u8]| policy::parse_http_date(v);
                new == old || date(new).is_some_and(|n| Some(n) == date(old))
            }
            (Some(_), None) => false,
            (None, _) => true,
        },
    }
}

/// The stored response freshened by a 304 (RFC 9111 §4.3.4, §3.2): its fields replaced by
/// those the 304 carries (except framing and hop-by-hop ones), its timing computed anew.
fn freshen(
    p: &RoutePolicy,
    o: &Object,
    fresh: &Fields,
    req_authorized: bool,
    request_time: u64,
    response_time: u64,
) -> Option<Object> {
    let update = fresh.iter().filter(|(n, _)| !policy::unstorable_field(n));
    let kept = o
        .fields
        .iter()
        .filter(|(n, _)| !update.clone().any(|(u, _)| u.eq_ignore_ascii_case(n)));
    // The 304's Age counts for the new age; it is not stored (`analyze` drops it).
    let age = policy::field(fresh, b"age").map(|a| (&b"age"[..], a));
    let with_age = Fields::from_pairs(kept.chain(update.clone()).chain(age))?;
    let s = analyze(
        p,
        o.status,
        with_age,
        req_authorized,
        request_time,
        response_time,
    )
    .ok()?;
    let tags = super::surrogate_keys(s.fields.view());
    let (fields, reason, url, body) = compact(&s.fields, &o.reason, &o.url, &o.body)?;
    Some(Object {
        status: o.status,
        reason,
        tags,
        fields,
        body,
        t: s.t,
        url,
        vary: o.vary.clone(),
        invalid: std::cell::Cell::new(false),
        born: std::cell::Cell::new(0),
    })
}

/// The stored response `o` with the fields of a 304 that validated it (RFC 9111 §4.3.4: its
/// fields replace the stored ones of the same names, but framing and hop-by-hop ones), to
/// answer the request that validated it (§4.3.3) when the result may not be stored
/// ([`freshen`] refused it: it is `private`, `no-store`, or sets a cookie the route does not
/// store). Not stored, so nothing is held back from this one client: its `Set-Cookie` goes
/// with it. Its age is the 304's `Age` (§4.2.3), and it is fresh for no one else. `None` when
/// the fields do not fit one block.
#[cold]
fn updated_once(o: &Object, fresh: &Fields, response_time: u64) -> Option<Object> {
    let update = fresh.iter().filter(|(n, _)| !policy::unstorable_field(n));
    let kept = o
        .fields
        .iter()
        .filter(|(n, _)| !update.clone().any(|(u, _)| u.eq_ignore_ascii_case(n)));
    let fields = Fields::from_pairs(kept.chain(update.clone()))?;
    let initial_age = policy::field(fresh, b"age")
        .and_then(|a| std::str::from_utf8(a).ok()?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(Object {
        status: o.status,
        reason: o.reason.clone(),
        tags: Vec::new(),
        fields,
        body: o.body.clone(),
        t: Timing {
            response_time,
            initial_age,
            lifetime: 0,
            swr: 0,
            sie: 0,
            no_stale: true,
            always_validate: true,
        },
        url: o.url.clone(),
        vary: o.vary.clone(),
        invalid: std::cell::Cell::new(false),
        born: std::cell::Cell::new(0),
    })
}

/// Copies of a freshened response's fields, reason, URL and body in one allocation. The
/// fields a 304 brings are in a block of their own, and the rest of the stored response's
/// slices of the allocation that held its own head: kept as they are, they would hold both
/// (and, freshening after freshening, every 304's), bytes the entry's weight does not count.
/// The copy holds what the weight counts. Rare: once per validation. `None` when the fields
/// do not fit one block ([`super::fields::MAX_BLOCK_BYTES`]).
fn compact(
    fields: &Fields,
    reason: &Bytes,
    url: &Bytes,
    body: &Bytes,
) -> Option<(Fields, Bytes, Bytes, Bytes)> {
    let heads = super::fields::pairs_len(fields.iter())?;
    let mut buf = BytesMut::with_capacity(
        heads
            .checked_add(reason.len())?
            .checked_add(url.len())?
            .checked_add(body.len())?,
    );
    let spans = super::fields::put_pairs(&mut buf, fields.iter())?;
    buf.extend_from_slice(reason);
    buf.extend_from_slice(url);
    buf.extend_from_slice(body);
    let mut all = buf.freeze();
    let mut next = |len: usize| {
        let rest = all.split_off(len);
        std::mem::replace(&mut all, rest)
    };
    let block = next(heads);
    Some((
        Fields::from_block(block, spans),
        next(reason.len()),
        next(url.len()),
        next(body.len()),
    ))
}

/// RFC 9111 §4.3.5: a 200 to HEAD whose validators and length agree with the stored GET
/// freshens it like a 304; one that disagrees invalidates it. A HEAD with `no-store`
/// (`no_store`) freshens nothing: no part of its answer is stored (§5.2.1.5; before, its
/// fields and freshness were, as a 304's to a GET with `no-store` already were not).
#[allow(clippy::too_many_arguments)]
fn head_update(
    p: &RoutePolicy,
    cache: &WorkerCache,
    f: &Found,
    fields: &Fields,
    authorized: bool,
    no_store: bool,
    request_time: u64,
    now: u64,
) {
    let same = |name: &[u8]| match (
        policy::field(fields, name),
        policy::field(&f.obj.fields, name),
    ) {
        (Some(a), Some(b)) => a == b,
        (None, None) => true,
        _ => false,
    };
    let len_ok = policy::field(fields, b"content-length")
        .and_then(crate::http::parse_content_length)
        .is_none_or(|n| n == f.obj.body.len() as u64);
    if same(b"etag") && same(b"last-modified") && len_ok {
        if no_store {
            return;
        }
        if let Some(o) = freshen(p, &f.obj, fields, authorized, request_time, now) {
            cache.store_freshened(&f.key, &Rc::new(o), p.max_variants);
        }
    } else {
        invalidate(cache, &f.obj);
    }
}

/// Drops a stored response that the origin says is no longer current (a HEAD whose
/// validators disagree, §4.3.5; a 304 that selects nothing, §4.3.4; a freshened copy no
/// longer storable): through the invalidation path of unsafe methods (§4.4), so that every
/// worker's copy of the URL goes, and, with `[cache.redis]`, the Redis copies and the other
/// hosts' copies too. Every variant of the URL goes: rare, and a miss is always safe.
fn invalidate(cache: &WorkerCache, o: &Object) {
    cache.invalidate_everywhere(o.url.to_vec());
}

/// RFC 9111 §4.3.4: freshens `o` with the 304's `fields` and stores it (here, in Redis, on
/// the other workers); when the 304 carries a strong entity tag, every other variant stored
/// under `key` with that same strong tag is selected and freshened too, here and on the other
/// workers ([`Selected`]). Returns `o` freshened; `None` (and `o` invalidated) when the
/// freshened copy may not be stored.
#[allow(clippy::too_many_arguments)]
fn freshen_selected(
    p: &RoutePolicy,
    cache: &WorkerCache,
    key: &[u8],
    o: &Rc<Object>,
    fields: &Fields,
    authorized: bool,
    request_time: u64,
    now: u64,
) -> Option<Rc<Object>> {
    let Some(fresh) = freshen(p, o, fields, authorized, request_time, now) else {
        invalidate(cache, o);
        return None;
    };
    let fresh = Rc::new(fresh);
    cache.store_freshened(key, &fresh, p.max_variants);
    let Some(tag) = policy::field(fields, b"etag").filter(|e| !e.starts_with(b"W/")) else {
        return Some(fresh);
    };
    let sel = Selected {
        key: key.to_vec(),
        vary: o.vary.clone(),
        tag: tag.to_vec(),
        fields: fields.clone(),
        authorized,
        request_time,
        now,
    };
    sel.freshen_held(p, cache);
    // As for the validated copy (see `store_freshened`): the others are told when what they
    // would get is fresh, so that they do not validate it again themselves; so is Redis, for
    // the selected variants only it holds (stored by another host, or evicted here).
    if !fresh.t.always_validate && fresh.ttl(now) > 0 {
        // (A response that does not vary has no other variant to look for.)
        if let Some(layer) = cache.shared().filter(|_| !o.vary.is_empty()) {
            let (p, sel) = (p.clone(), sel.clone());
            layer.update_entries(key, now, move |v| sel.freshen_one(&p, v));
        }
        let p = p.clone();
        cache.post_to_others(move |c| sel.freshen_held(&p, c));
    }
    Some(fresh)
}

/// The other stored responses a 304 with a strong entity tag selects (RFC 9111 §4.3.4: "all
/// the stored responses with the same strong validator"): the variants of the validated
/// response's key with that tag, on whichever worker holds them, and in Redis.
#[derive(Clone)]
struct Selected {
    key: Vec<u8>,
    /// The validated variant's Vary values (that one is freshened by its validation).
    vary: Vec<(Box<[u8]>, Vec<u8>)>,
    tag: Vec<u8>,
    /// The 304's fields, and what [`freshen`] takes with them.
    fields: Fields,
    authorized: bool,
    request_time: u64,
    now: u64,
}

impl Selected {
    /// Freshens the selected variants `cache` holds, and writes them to Redis.
    fn freshen_held(&self, p: &RoutePolicy, cache: &WorkerCache) {
        let held = cache.get(&self.key).unwrap_or_default();
        for v in &held {
            if let Some(f) = self.freshen_one(p, v) {
                let f = Rc::new(f);
                cache.insert(&self.key, f.clone(), p.max_variants);
                cache.share(&self.key, &f, p.max_variants);
            }
        }
    }

    /// `v` freshened, when it is one of the selected: another variant than the validated one,
    /// with the strong tag. (One freshened by this 304 already comes out the same again.)
    fn freshen_one(&self, p: &RoutePolicy, v: &Object) -> Option<Object> {
        if v.vary == self.vary || !v.etag().is_some_and(|e| policy::strong_match(&self.tag, e)) {
            return None;
        }
        let (auth, t0, t1) = (self.authorized, self.request_time, self.now);
        freshen(p, v, &self.fields, auth, t0, t1)
    }
}

/// Gives the upstream connection back (or drops it) with the bookkeeping the proxy does
/// ([`forward::settle`]); `failed`: the relay failed (the response already counted as one
/// when it was a 5xx).
#[inline(always)]
fn release(w: &Worker, group: &UpstreamGroup, ch: Chosen, failed: bool, reusable: bool) {
    forward::settle(w, group, ch.up, ch.probe, ch.failed || failed, reusable);
}

#[allow(clippy::too_many_arguments)]
async fn fetch<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    mode: Fetch<'_>,
    // Lent, not moved: the future is made and begun without copying it twice.
    status: &mut Status<'_>,
) -> Outcome<'c> {
    let request_time = match &mode {
        Fetch::Fill { request_time, .. } => *request_time,
        _ => now_secs(),
    };
    // The stored response's validators replace the client's (a 304 then freshens it).
    let mut validating = false;
    let mut swapped: Option<RequestHead> = None;
    if let Fetch::Fill { stale: Some(f), .. } = &mode {
        // A revalidation (once per stored response's lifetime): out of the miss's way.
        std::hint::cold_path();
        let limits = cfg
            .listener_limits
            .get(c.info.listener)
            .unwrap_or(&cfg.limits);
        if let Some(h) = conditional_head(&ctx.head, &f.obj, limits, w.bufs.take_head()) {
            swapped = Some(std::mem::replace(&mut ctx.head, h));
            validating = true;
        }
    }
    let mut resp = w.bufs.take_resp();
    let r = forward::exchange(w, cfg, route, group, c, ctx, &mut resp).await;
    if r.is_ok() {
        drop_forged_members(p, &mut resp);
    }
    if let Some(orig) = swapped.take() {
        std::hint::cold_path();
        let h = std::mem::replace(&mut ctx.head, orig);
        w.bufs.give_head(h);
    }
    let now = now_secs();
    let out = fetched(
        w,
        cfg,
        route,
        p,
        group,
        c,
        ctx,
        mode,
        status,
        r,
        &mut resp,
        validating,
        request_time,
        now,
    )
    .await;
    w.bufs.give_resp(resp);
    out
}

/// The usual miss ([`Look::Miss`]): a GET with nothing stored under its keys, its flight
/// begun (`guard`, unless too many are). A response whose body came whole with its head (the
/// usual small one) is analysed with its body into the object that stores it, stored before
/// it is relayed (waiters on the flight are answered from the store at once), or relayed as
/// the analysis refused it; any other answer goes on to [`fetched`]. Its own future, not
/// [`fetch`]'s: the usual miss's code is this function's few lines, not a path through every
/// kind of fetch's.
#[allow(clippy::too_many_arguments)]
async fn fill<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    keys: &Keys<'_>,
    mut guard: Option<FlightGuard>,
    req: &Directives,
    authorized: bool,
    request_time: u64,
    fwd: &'static str,
) -> Outcome<'c> {
    let cache = &w.cache;
    let mut status = Status::new(p, fwd);
    let mut resp = w.bufs.take_resp();
    let r = forward::exchange(w, cfg, route, group, c, ctx, &mut resp).await;
    if r.is_ok() {
        drop_forged_members(p, &mut resp);
    }
    let now = now_secs();
    let r = 'whole: {
        let mut ch = match r {
            Ok(ch) => ch,
            Err(e) => break 'whole Err(e),
        };
        if resp.status == 304 && !preconditioned(&ctx.head) {
            break 'whole Err(unasked_304(w, group, ch, &mut resp));
        }
        // What storing will touch, while the analysis runs.
        let head = &ctx.head;
        let also = [
            head.host_bytes().unwrap_or(b""),
            head.bytes(head.path_query),
        ];
        cache.prefetch_store(keys.shared_key(), also);
        status.fwd_status = resp.status;
        match analyze_if_whole(
            p,
            cache,
            &resp,
            &ch,
            req,
            &sent(cfg, route, c, ctx),
            authorized,
            request_time,
            now,
        ) {
            Some(a) => {
                if let Err(d) = keep_whole(cache, p, keys, a, &mut guard, &mut status) {
                    status.detail = Some(d);
                    // A 206 may be stored as a piece (RFC 9111 §3.3); its flight's waiters
                    // still go upstream alone (they wait for the whole response).
                    if resp.status == 206 {
                        let sent = sent(cfg, route, c, ctx);
                        let kept = piece_whole(
                            p,
                            cache,
                            &resp,
                            &ch,
                            req,
                            &sent,
                            keys,
                            authorized,
                            request_time,
                            now,
                        );
                        status.note_kept(kept);
                    }
                }
            }
            None => break 'whole Ok(ch),
        }
        let mark = ctx.resp_headers.len();
        status.put_fetched(p, &mut ctx.resp_headers);
        // Relayed here, not through `relay_as_is`: a future of its own there costs the usual
        // miss some 130 instructions.
        let (out, reusable) =
            forward_response_tee(w, cfg, route, c, ctx, &mut ch.up, &resp, None).await;
        if matches!(out, Outcome::Answer(_)) {
            relay_refused(&mut status, ctx, mark, &out);
        }
        resp.raw = Bytes::new();
        release(w, group, ch, matches!(out, Outcome::Answer(_)), reusable);
        // A flight whose response was not stored ends once it is relayed: its waiters go
        // upstream alone, or one takes over a relay that failed.
        if let Some(g) = guard {
            let relayed = matches!(out, Outcome::Relayed { .. });
            g.finish(if relayed {
                FlightEnd::NotStorable
            } else {
                FlightEnd::Failed
            });
        }
        w.bufs.give_resp(resp);
        return out;
    };
    let mode = Fetch::Fill {
        keys,
        stale: None,
        guard,
        req,
        authorized,
        request_time,
    };
    let out = fetched(
        w,
        cfg,
        route,
        p,
        group,
        c,
        ctx,
        mode,
        &mut status,
        r,
        &mut resp,
        false,
        request_time,
        now,
    )
    .await;
    w.bufs.give_resp(resp);
    out
}

/// The analysis of a response whose body came whole with its head, into the object that
/// stores it ([`analyze_whole`]); `None` when the body is not all there, its length is not
/// known or is over the route's bound, or the request said `no-store`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn analyze_if_whole(
    p: &RoutePolicy,
    cache: &WorkerCache,
    resp: &ResponseHead,
    ch: &Chosen,
    req: &Directives,
    sent: &Sent<'_>,
    authorized: bool,
    request_time: u64,
    now: u64,
) -> Option<Result<(Rc<Object>, bool), &'static str>> {
    let max = p.max_object.min(usize::MAX as u64);
    let known = known_len(resp).filter(|n| *n <= max)?;
    let in_buf = match resp.body {
        RespBody::Length(n) => (ch.up.rbuf.len() as u64) >= n,
        RespBody::None => true,
        _ => false,
    };
    if !in_buf || req.no_store {
        return None;
    }
    let body = ch.up.rbuf.get(..known as usize)?;
    Some(analyze_whole(
        p,
        resp,
        sent,
        cache,
        body,
        authorized,
        request_time,
        now,
    ))
}

/// Stores what [`analyze_if_whole`] made of a whole response (`analysed`) under the key it
/// chose (borrowed from `keys`, which the request holds to the end), and ends the request's
/// flight as stored (`guard`: its waiters are answered from the store at once). Why it was not
/// stored otherwise, for `Cache-Status`.
#[inline(always)]
fn keep_whole(
    cache: &WorkerCache,
    p: &RoutePolicy,
    keys: &Keys<'_>,
    analysed: Result<(Rc<Object>, bool), &'static str>,
    guard: &mut Option<FlightGuard>,
    status: &mut Status<'_>,
) -> Result<(), &'static str> {
    let (obj, public) = analysed?;
    // (Without a key the object is dropped: rare, a route that keys by consumer.)
    let k = keys.store_key(p, public).ok_or("no-consumer")?;
    store_object(cache, p, keys, k, obj)?;
    if let Some(g) = guard.take() {
        g.finish(FlightEnd::Stored);
    }
    status.stored = true;
    Ok(())
}

/// Whether `head`, as sent upstream, asked a question a 304 answers: `If-None-Match` or
/// `If-Modified-Since` (RFC 9110 §13.1.2, §13.1.3, §15.4.5).
fn preconditioned(head: &RequestHead) -> bool {
    head.header(b"if-none-match").is_some() || head.header(b"if-modified-since").is_some()
}

/// A 304 to a request sent without a precondition (RFC 9110 §15.4.5: it only answers a
/// conditional GET or HEAD; RFC 9111 §4.3.3 takes one only as a validation's answer): an
/// invalid response, as one with a malformed head is. Its connection is dropped and counted
/// as a failure of the endpoint; the request is answered 502 (`upstream-bad-response`),
/// nothing stored. Before, it was relayed to a client that had asked nothing it answers.
#[cold]
#[inline(never)]
fn unasked_304(
    w: &Worker,
    group: &UpstreamGroup,
    ch: Chosen,
    resp: &mut ResponseHead,
) -> AttemptError {
    resp.raw = Bytes::new();
    release(w, group, ch, true, false);
    AttemptError::Bad
}

/// What follows a fetch's exchange (`r`, with the response head `resp` when it answered):
/// the answer to a failed one, a stale response served or freshened, or the response relayed
/// (stored when it may be). `validating`: the request carried the stored response's
/// validators (a 304 freshens it); `now`: when the response head was read.
#[allow(clippy::too_many_arguments)]
async fn fetched<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    mode: Fetch<'_>,
    status: &mut Status<'_>,
    r: Result<Chosen, AttemptError>,
    resp: &mut ResponseHead,
    validating: bool,
    request_time: u64,
    now: u64,
) -> Outcome<'c> {
    let cache = &w.cache;
    // §3.5. A fill read it with the request's directives.
    let authorized = match &mode {
        Fetch::Fill { authorized, .. } => *authorized,
        _ => ctx.head.header(b"authorization").is_some(),
    };
    // What was sent had the stored response's validators (`validating`) or the client's
    // head's conditionals (`ctx.head` is the head sent, or the client's where the cache sent
    // its own with the same conditionals: a rest request).
    let r = match r {
        Ok(ch) if resp.status == 304 && !validating && !preconditioned(&ctx.head) => {
            Err(unasked_304(w, group, ch, resp))
        }
        r => r,
    };
    let out = match r {
        Err(e) => {
            // (Rare: out of the way of the usual path's code.)
            std::hint::cold_path();
            // A failed upstream phase has its latency too (as `forward::proxy` records it).
            if ctx.rec.upstream_start.is_some() {
                ctx.rec.upstream_answered(std::time::Instant::now());
            }
            if let Fetch::Fill {
                stale: Some(f),
                req,
                ..
            } = &mode
            {
                if stale_if_error(&f.obj, req, now) {
                    cache.count(|s| s.stale_hits += 1);
                    status.hit = true;
                    status.ttl = Some(f.obj.ttl(now));
                    status.detail = Some("stale-if-error");
                    let out = answer(w, &cfg.via, route, c, ctx, &f.obj, now, status).await;
                    return out;
                }
            }
            match e {
                AttemptError::Down(DownFail::Gone) => Outcome::Abort,
                e => match e.answer() {
                    // The one place where the cache phase turns a failed trip upstream into
                    // the gateway's answer: it carries the cache's member too, with why
                    // (RFC 9211 §2.7), after what the request got this far (`fwd`).
                    Some(g) => {
                        status.fwd_status = 0;
                        status.detail = Some(failure_detail(g));
                        status.put(&mut ctx.resp_headers);
                        Outcome::from(g)
                    }
                    None => Outcome::Abort,
                },
            }
        }
        Ok(mut ch) => {
            status.fwd_status = resp.status;
            match mode {
                Fetch::Fill {
                    keys,
                    stale,
                    mut guard,
                    req,
                    authorized: _,
                    request_time: _,
                } => {
                    if let Some(f) = stale.as_ref().filter(|_| validating && resp.status == 304) {
                        std::hint::cold_path();
                        // §4.3.4: freshen the stored response and answer from it.
                        let fields = copy_fields(resp);
                        resp.raw = Bytes::new();
                        release(w, group, ch, false, false);
                        // A validator that is not the stored one selects nothing: the stored
                        // response is dropped and fetched again whole.
                        if !selected_by_304(&fields, &f.obj) {
                            invalidate(cache, &f.obj);
                            // Its own invalidation: the fetch below is sent after it.
                            keys.purges.set(cache.purges());
                            // A second request: it is sent after `now`.
                            let again = Fetch::Fill {
                                keys,
                                stale: None,
                                guard,
                                req,
                                authorized,
                                request_time: now,
                            };
                            return Box::pin(fetch(w, cfg, route, p, group, c, ctx, again, status))
                                .await;
                        }
                        cache.count(|s| s.revalidations += 1);
                        // Purged or invalidated since the request went: answered, not stored
                        // again (RFC 9111 §4.4). A request with `no-store` has no part of its
                        // answer stored (§5.2.1.5): the 304's fields update only its own
                        // answer, not the stored response.
                        let purged = cache.purged_since(keys.purges.get(), &f.obj).is_some();
                        let fresh = if purged || req.no_store {
                            None
                        } else {
                            freshen_selected(
                                p,
                                cache,
                                &f.key,
                                &f.obj,
                                &fields,
                                authorized,
                                request_time,
                                now,
                            )
                        };
                        let obj = match fresh {
                            Some(o) => {
                                if let Some(g) = guard {
                                    g.finish(FlightEnd::Stored);
                                }
                                status.stored = true;
                                o
                            }
                            // Not storable as freshened (`private`, `no-store`, a
                            // `Set-Cookie` the route does not store): still the answer to this
                            // request (§4.3.3), with the 304's fields, once.
                            None => updated_once(&f.obj, &fields, now)
                                .map_or_else(|| f.obj.clone(), Rc::new),
                        };
                        status.fwd = "stale";
                        status.ttl = Some(obj.ttl(now));
                        let out = answer(w, &cfg.via, route, c, ctx, &obj, now, status).await;
                        return out;
                    }
                    if let Some(f) = stale.as_ref().filter(|f| {
                        matches!(resp.status, 500 | 502 | 503 | 504)
                            && stale_if_error(&f.obj, req, now)
                    }) {
                        std::hint::cold_path();
                        resp.raw = Bytes::new();
                        release(w, group, ch, true, false);
                        cache.count(|s| s.stale_hits += 1);
                        status.hit = true;
                        status.ttl = Some(f.obj.ttl(now));
                        status.detail = Some("stale-if-error");
                        let out = answer(w, &cfg.via, route, c, ctx, &f.obj, now, status).await;
                        return out;
                    }
                    let max = p.max_object.min(usize::MAX as u64);
                    // Room for a body of known length that may be stored (one too large is
                    // not: see below).
                    let body_room = known_len(resp).filter(|n| *n <= max).unwrap_or(0) as usize;
                    // A body already read whole with the head (a small response, the usual
                    // case) is analysed with it into the object that stores it, stored before
                    // the response is relayed: waiters on this fetch are answered from the
                    // store at once, and nothing is published to them or captured on the way
                    // to the client (as [`fill`] does for the usual miss).
                    let whole = analyze_if_whole(
                        p,
                        cache,
                        resp,
                        &ch,
                        req,
                        &sent(cfg, route, c, ctx),
                        authorized,
                        request_time,
                        now,
                    );
                    let mut charge = None;
                    // The range of a 206 to store as a piece, and the piece's key.
                    let mut piece = None;
                    let piece_k: Vec<u8>;
                    let mut plan = match whole {
                        Some(a) => {
                            let kept = match keep_whole(cache, p, keys, a, &mut guard, status) {
                                Ok(()) => Ok(()),
                                Err(_)
                                    if resp.status == 206
                                        && !validating
                                        && status.note_kept(piece_whole(
                                            p,
                                            cache,
                                            resp,
                                            &ch,
                                            req,
                                            &sent(cfg, route, c, ctx),
                                            keys,
                                            authorized,
                                            request_time,
                                            now,
                                        )) =>
                                {
                                    // Stored as a piece (RFC 9111 §3.3): the flight's waiters
                                    // wait for the whole response, and go upstream alone.
                                    if let Some(g) = guard.take() {
                                        g.finish(FlightEnd::NotStorable);
                                    }
                                    Ok(())
                                }
                                Err(d) => Err(d),
                            };
                            match kept {
                                Ok(()) => {
                                    return relay_as_is(
                                        w,
                                        cfg,
                                        route,
                                        group,
                                        c,
                                        ctx,
                                        ch,
                                        resp,
                                        status,
                                        Some(p),
                                    )
                                    .await;
                                }
                                Err(d) => Err(d),
                            }
                        }
                        None if req.no_store => Err("request-no-store"),
                        None => {
                            // The body's room (all of it as it arrives, when its length is not
                            // known) is held against the worker's in-flight bound until it is
                            // stored: a body that does not fit streams through unstored.
                            charge = cache.charge_in_flight(body_room as u64);
                            let room = if charge.is_some() { body_room } else { 0 };
                            // (A validation went without the client's `Range`: its 206
                            // is no piece of what was asked.)
                            let analysed = if resp.status == 206 && !validating {
                                // A piece (RFC 9111 §3.3), captured as it streams.
                                std::hint::cold_path();
                                piece_range(&ctx.head, resp).and_then(|cr| {
                                    piece = Some(cr);
                                    analyze_piece(
                                        p,
                                        resp,
                                        &ctx.head,
                                        cache,
                                        Err(room),
                                        authorized,
                                        request_time,
                                        now,
                                    )
                                })
                            } else {
                                analyze_response(
                                    p,
                                    resp,
                                    &ctx.head,
                                    cache,
                                    room,
                                    authorized,
                                    request_time,
                                    now,
                                )
                            };
                            analysed.and_then(|s| {
                                if charge.is_none() {
                                    return Err("in-flight-full");
                                }
                                Ok(s)
                            })
                        }
                    };
                    // Borrowed from `keys`, which this request holds to the end (or from
                    // `piece_k`, a piece's).
                    let mut key = plan.as_ref().ok().and_then(|s| keys.store_key(p, s.public));
                    if let (Some(_), Some(k)) = (piece, key) {
                        std::hint::cold_path();
                        piece_k = piece_key(k);
                        key = Some(&piece_k[..]);
                    }
                    if plan.is_ok() && key.is_none() {
                        plan = Err("no-consumer");
                    }
                    if let (Ok(_), RespBody::Length(n)) = (&plan, resp.body) {
                        if n > max {
                            plan = Err("too-large");
                        }
                    }
                    // Waiters on this fetch receive the body as it arrives when they may share it
                    // (stored under the shared key): as it came when its length is known,
                    // re-chunked when it is chunked (not when the upstream's close ends it: that
                    // end cannot be told from a failure).
                    let stream_len = match resp.body {
                        RespBody::Chunked => Some(None),
                        _ => known_len(resp).map(Some),
                    };
                    let flight = match (&mut plan, &guard, stream_len) {
                        (Ok(s), Some(g), Some(len)) if key == Some(&keys.shared[..]) => {
                            // The fields (and Vary values) are lent to the stream while the
                            // fetch lasts, and taken back to be stored (not copied).
                            g.flight().publish(FlightStream {
                                status: resp.status,
                                reason: reason_of(resp),
                                fields: std::mem::take(&mut s.fields),
                                len,
                                t: s.t,
                                vary: vary_values(&s.vary, &sent(cfg, route, c, ctx)),
                            });
                            Some(g.flight().clone())
                        }
                        _ => None,
                    };
                    let published = flight.is_some();
                    let mut tee = plan.as_mut().ok().zip(charge).map(|(s, charge)| {
                        Tee::with_buf(max as usize, std::mem::take(&mut s.body), flight, charge)
                    });
                    // RFC 9211 §2.5: `stored` says the cache stored the response, and the
                    // member goes out with the head, before this body (not in hand: a whole
                    // one was stored above) has come. The upstream may still cut it, and
                    // then it is never stored: the member does not claim it, and says why
                    // (`streamed`: stored, or not, once the body is whole).
                    status.detail = Some(match &plan {
                        Ok(_) => STREAMED,
                        Err(d) => d,
                    });
                    let mark = ctx.resp_headers.len();
                    status.put_fetched(p, &mut ctx.resp_headers);
                    let (out, reusable) =
                        forward_response_tee(w, cfg, route, c, ctx, &mut ch.up, resp, tee.as_mut())
                            .await;
                    if matches!(out, Outcome::Answer(_)) {
                        relay_refused(status, ctx, mark, &out);
                    }
                    // Whole also when the client went away part way and the body was read
                    // on for the store and the waiters (its connection closes: `out`).
                    let complete = matches!(out, Outcome::Relayed { .. })
                        || tee.as_ref().is_some_and(|t| t.drained);
                    let failed = matches!(out, Outcome::Answer(_));
                    if complete {
                        if let Some(t) = &tee {
                            t.body_ended();
                        }
                    }
                    // The reason phrase to store: the stream has it when it was published.
                    let reason = (plan.is_ok() && !published).then(|| reason_of(resp));
                    let status_code = resp.status;
                    resp.raw = Bytes::new();
                    release(w, group, ch, failed, reusable);
                    let mut end = FlightEnd::NotStorable;
                    // What was lent to the stream comes back (only a body past the bound,
                    // which is not stored, takes it away before).
                    let lent = guard
                        .as_ref()
                        .filter(|_| published)
                        .and_then(|g| g.flight().take_stream());
                    if let (Ok(mut s), Some(k), Some(t)) = (plan, key, tee) {
                        let (vary, reason) = match lent {
                            Some(st) => {
                                s.fields = st.fields;
                                (Some(st.vary), st.reason)
                            }
                            None if published => (None, Bytes::new()),
                            None => (
                                Some(vary_values(&s.vary, &sent(cfg, route, c, ctx))),
                                reason.unwrap_or_default(),
                            ),
                        };
                        if let (true, false, Some(vary)) = (complete, t.over, vary) {
                            let stored = match piece {
                                None => store(
                                    cache,
                                    p,
                                    keys,
                                    k,
                                    &mut s,
                                    status_code,
                                    reason,
                                    t.finish(),
                                    vary,
                                ),
                                Some(cr) => {
                                    let body = t.finish();
                                    let o = build_object(cache, &mut s, 206, reason, body, vary);
                                    store_piece(cache, p, keys, k, o, cr)
                                }
                            };
                            // (Relayed already: its Cache-Status said stored. Its waiters
                            // go upstream themselves when it was not.)
                            // (A piece is not what the flight's waiters wait for.)
                            end = if stored.is_ok() && piece.is_none() {
                                FlightEnd::Stored
                            } else {
                                FlightEnd::NotStorable
                            };
                        } else if !complete {
                            end = FlightEnd::Failed;
                        }
                    } else if !complete {
                        end = FlightEnd::Failed;
                    }
                    if let Some(g) = guard {
                        g.finish(end);
                    }
                    out
                }
                Fetch::Invalidate(url, split) => {
                    // §4.4: a non-error answer to an unsafe method invalidates the target URI
                    // and the Location / Content-Location URIs of the same origin, when it is
                    // received: before the client can have it and send its next request.
                    if (200..400).contains(&resp.status) {
                        for u in invalidated_urls(&mut ctx.head, resp, url, split) {
                            // The URL as the key of each route whose key is not the URL as
                            // sent reads it too: where their objects of it are stored.
                            for k in keyed_urls(&cfg.router.routes, &u) {
                                cache.invalidate_everywhere(k);
                            }
                            cache.invalidate_everywhere(u);
                        }
                    }
                    relay_as_is(w, cfg, route, group, c, ctx, ch, resp, status, None).await
                }
                Fetch::Pass => {
                    relay_as_is(w, cfg, route, group, c, ctx, ch, resp, status, None).await
                }
                Fetch::Head(found, purges, no_store) => {
                    let current = |f: &Found| cache.purged_since(purges, &f.obj).is_none();
                    if let Some(f) = found.filter(|f| resp.status == 200 && current(f)) {
                        head_update(
                            p,
                            cache,
                            &f,
                            &copy_fields(resp),
                            authorized,
                            no_store,
                            request_time,
                            now,
                        );
                    }
                    relay_as_is(w, cfg, route, group, c, ctx, ch, resp, status, None).await
                }
            }
        }
    };
    out
}

/// A relay that answered for the upstream instead ([`Outcome::Answer`]: the body's framing
/// was bad before any of the response went to the client, so the gateway's 502 goes out in
/// its place): the member put at `mark` in the answer's extra lines, which described the
/// response to be relayed, gives way to one naming the failure, as for a failed trip upstream
/// (RFC 9211 §2.7). (Once the head went out, the relay cuts the connection instead.)
#[cold]
#[inline(never)]
fn relay_refused(
    status: &mut Status<'_>,
    ctx: &mut RequestCtx<'_>,
    mark: usize,
    out: &Outcome<'_>,
) {
    let Outcome::Answer(Answer::Error(g)) = out else {
        return;
    };
    ctx.resp_headers.truncate(mark);
    status.hit = false;
    status.fwd_status = 0;
    status.ttl = None;
    status.stored = false;
    status.collapsed = false;
    status.detail = Some(failure_detail(*g));
    status.put(&mut ctx.resp_headers);
}

/// The `Cache-Status` detail (RFC 9211 §2.7) of an answer the gateway makes for a failed trip
/// upstream: the error's code ([`GatewayError::code`]) in the words of the cache's other
/// details (hyphens).
#[cold]
fn failure_detail(e: GatewayError) -> &'static str {
    use crate::http::request::ParseError;
    match e {
        GatewayError::UpstreamConnect => "upstream-connect-failed",
        GatewayError::UpstreamConnectTimeout => "upstream-connect-timeout",
        GatewayError::UpstreamTimeout => "upstream-timeout",
        GatewayError::UpstreamBadResponse => "upstream-bad-response",
        GatewayError::UpstreamClosed => "upstream-closed",
        GatewayError::UpstreamTls => "upstream-tls-failed",
        GatewayError::NoHealthyEndpoint => "no-healthy-endpoint",
        GatewayError::CircuitOpen(_) => "circuit-open",
        GatewayError::Overloaded => "upstream-overloaded",
        // The request's own body failed on its way upstream.
        GatewayError::ClientTimeout => "request-timeout",
        GatewayError::BodyTooLarge => "body-too-large",
        GatewayError::Parse(ParseError::HeadTooLarge) => "header-too-large",
        GatewayError::Parse(_) | GatewayError::BadChunk(_) => "bad-request",
        // Not answers of a trip upstream (refused before the cache phase), named all the same.
        GatewayError::NoRoute => "no-route",
        GatewayError::RateLimited(_) => "rate-limited",
        GatewayError::ConcurrencyLimited => "concurrency-limited",
        GatewayError::RateLimitUnavailable => "rate-limit-unavailable",
        GatewayError::ClientCertRequired => "client-certificate-required",
        GatewayError::Unauthorized(_) => "unauthorized",
        GatewayError::Forbidden => "forbidden",
        GatewayError::AuthUnavailable => "auth-unavailable",
    }
}

/// Relays the response `resp` from `ch` to the client as it came (nothing captured for the
/// store) with `status`'s member (written by [`Status::put_fetched`] for `fetched`'s fetch,
/// else by [`Status::put`]), then gives the upstream connection back ([`release`]): a relay
/// that failed counts against the endpoint.
#[allow(clippy::too_many_arguments)]
async fn relay_as_is<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    mut ch: Chosen,
    resp: &mut ResponseHead,
    status: &mut Status<'_>,
    fetched: Option<&RoutePolicy>,
) -> Outcome<'c> {
    let mark = ctx.resp_headers.len();
    match fetched {
        Some(p) => status.put_fetched(p, &mut ctx.resp_headers),
        None => status.put(&mut ctx.resp_headers),
    }
    let (out, reusable) = forward_response_tee(w, cfg, route, c, ctx, &mut ch.up, resp, None).await;
    if matches!(out, Outcome::Answer(_)) {
        relay_refused(status, ctx, mark, &out);
    }
    // The head shares the upstream's read buffer: released before the connection is reused.
    resp.raw = Bytes::new();
    release(w, group, ch, matches!(out, Outcome::Answer(_)), reusable);
    out
}

/// Stores a fetched response under `k` (one of `keys`), here and in Redis: what `s` kept of it,
/// with its status, reason phrase, body and the request's values of the fields it varies on
/// (`vary`, [`vary_values`]); `s.url` is its URL. The object is what [`make_object`] makes of
/// the same parts (a test compares the two), built where it is kept ([`WorkerCache::new_object`]:
/// an evicted object's allocation, once the store is full), not made and moved there.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn store(
    cache: &WorkerCache,
    p: &RoutePolicy,
    keys: &Keys,
    k: &[u8],
    s: &mut Storable,
    status: u16,
    reason: Bytes,
    body: Bytes,
    vary: Vec<(Box<[u8]>, Vec<u8>)>,
) -> Result<(), &'static str> {
    let obj = build_object(cache, s, status, reason, body, vary);
    store_object(cache, p, keys, k, obj)
}

/// Stores `obj` under `k` (one of `keys`), here and in Redis; unless a purge or an
/// invalidation applied since the fetch began covers it (RFC 9111 §4.4: the response to a
/// request sent before it is not current): a soft one stores it stale, a hard one not at all
/// (`Err`, the reason for `Cache-Status`).
#[inline(always)]
fn store_object(
    cache: &WorkerCache,
    p: &RoutePolicy,
    keys: &Keys,
    k: &[u8],
    obj: Rc<Object>,
) -> Result<(), &'static str> {
    match cache.purged_since(keys.purges.get(), &obj) {
        None => {}
        Some(true) => obj.invalid.set(true),
        Some(false) => return Err("invalidated"),
    }
    // The shared key's hash was taken for the lookup (`k` is borrowed from `keys`: the same
    // slice when it is that key).
    let at = if std::ptr::eq(k, &keys.shared[..]) {
        keys.shared_key()
    } else {
        cache.key(k)
    };
    // Shared first, so that the object itself (not a second reference) goes into the store.
    cache.share(k, &obj, p.max_variants);
    cache.insert_key(at, obj, p.max_variants);
    Ok(())
}

/// The object that stores a response analysed with its body ([`analyze_whole`]: `s.body`
/// holds it): [`make_object`] of the same parts (a test compares the two), each moved from
/// the analysis to where the object keeps it, built in the object `cache` gives
/// ([`WorkerCache::new_object`]).
#[inline(always)]
fn whole_object(
    cache: &WorkerCache,
    s: Storable,
    resp: &ResponseHead,
    req: &Sent<'_>,
) -> Rc<Object> {
    let tags = tags_of(&s);
    let Storable {
        fields,
        t,
        public: _,
        vary: names,
        tagged: _,
        url,
        body,
    } = s;
    let vary = vary_values(&names, req);
    drop_vec(names);
    let (status, reason, body) = (resp.status, reason_of(resp), body.freeze());
    cache.new_object(
        #[inline(always)]
        |o| put_parts(o, status, reason, fields, body, t, url, tags, vary),
    )
}

/// Writes an object's parts into `o` (the object [`WorkerCache::new_object`] gives), field by
/// field, each where it is kept (an assignment of a whole `Object` would build it aside and
/// copy it over). The pattern names every field: none is left as the former object had it.
/// Inlined where `new_object` calls it: no call, and the parts are not written aside first.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn put_parts(
    o: &mut Object,
    status: u16,
    reason: Bytes,
    fields: Fields,
    body: Bytes,
    t: Timing,
    url: Bytes,
    tags: Vec<Box<[u8]>>,
    vary: Vec<(Box<[u8]>, Vec<u8>)>,
) {
    let Object {
        status: o_status,
        reason: o_reason,
        fields: o_fields,
        body: o_body,
        t: o_t,
        url: o_url,
        tags: o_tags,
        vary: o_vary,
        invalid: o_invalid,
        born: _,
    } = o;
    *o_status = status;
    *o_reason = reason;
    // (The former object's block was taken when it was kept: its spans' vector, and most
    // objects' tags and Vary values, hold no allocation.)
    let (block, spans) = std::mem::replace(o_fields, fields).into_parts();
    drop(block);
    drop_vec(spans);
    *o_body = body;
    *o_t = t;
    *o_url = url;
    drop_vec(std::mem::replace(o_tags, tags));
    drop_vec(std::mem::replace(o_vary, vary));
    o_invalid.set(false);
}

/// Drops `v`, most often one that holds no allocation: that one without a call to its drop
/// glue (a vector of capacity 0 has no element and no buffer: forgetting it frees nothing
/// that dropping it would).
#[inline(always)]
fn drop_vec<T>(v: Vec<T>) {
    if v.capacity() == 0 {
        std::mem::forget(v);
    } else {
        drop(v);
    }
}

/// [`make_object`] of these parts (`s.url` the URL), built in the object `cache` gives
/// ([`WorkerCache::new_object`]). What the object keeps is taken out of `s` (moved, not
/// copied: `s` is left where it lies, holding empty parts).
#[inline]
fn build_object(
    cache: &WorkerCache,
    s: &mut Storable,
    status: u16,
    reason: Bytes,
    body: Bytes,
    vary: Vec<(Box<[u8]>, Vec<u8>)>,
) -> Rc<Object> {
    let tags = tags_of(s);
    // Taken out of `s` (defaults left there, dropped with it for nothing).
    let (fields, url) = (std::mem::take(&mut s.fields), std::mem::take(&mut s.url));
    let t = s.t;
    cache.new_object(
        #[inline(always)]
        |o| put_parts(o, status, reason, fields, body, t, url, tags, vary),
    )
}

/// A response's reason phrase to keep: the usual one for its status is not copied.
#[inline(always)]
fn reason_of(resp: &ResponseHead) -> Bytes {
    let r = resp.bytes(resp.reason);
    // The most common status line of all, "200 OK", without looking the usual phrase up.
    if resp.status == 200 && r == b"OK" {
        // (The phrase `reason_phrase` has for 200: a constant once inlined.)
        return Bytes::from_static(reason_phrase(200).as_bytes());
    }
    // (Out of the usual object's code lines.)
    std::hint::cold_path();
    reason_of_other(resp.status, r)
}

/// [`reason_of`] for a status line other than "200 OK" (`r` its phrase).
#[inline(never)]
fn reason_of_other(status: u16, r: &[u8]) -> Bytes {
    let usual = reason_phrase(status).as_bytes();
    // Compared byte by byte: a phrase is a few bytes ("OK"), less than a call to `memcmp`
    // costs to set up.
    if r.len() == usual.len() && r.iter().zip(usual).all(|(a, b)| a == b) {
        Bytes::from_static(usual)
    } else {
        Bytes::copy_from_slice(r)
    }
}

fn known_len(resp: &ResponseHead) -> Option<u64> {
    match resp.body {
        RespBody::Length(n) => Some(n),
        RespBody::None => Some(0),
        _ => None,
    }
}

/// The URLs a non-error answer to the unsafe method `head` invalidates (RFC 9111 §4.4):
/// `url`, the target's, and the same-origin `Location` / `Content-Location` URLs of `resp`.
/// With a scheme split ([`scheme_split`]: the origin was told the other scheme, which moves
/// the key), each of them also as the origin read it: the resource it changed is that one
/// (`POST http://a.test:443/p` told https changes `https://a.test/p`, keyed `a.test/p`).
fn invalidated_urls(
    head: &mut RequestHead,
    resp: &ResponseHead,
    url: Vec<u8>,
    split: bool,
) -> Vec<Vec<u8>> {
    let locations = |head: &RequestHead, out: &mut Vec<Vec<u8>>| {
        for n in [&b"location"[..], b"content-location"] {
            out.extend(resp.header(n).and_then(|v| same_host_url(head, v)));
        }
    };
    let mut urls = vec![url];
    locations(head, &mut urls);
    if split {
        // Read under the scheme the origin was told, then the target's again.
        head.https = !head.https;
        let mut told = Vec::new();
        url_of(head, &mut told);
        urls.push(told);
        locations(head, &mut urls);
        head.https = !head.https;
    }
    urls
}

/// The URLs objects of `url` (as [`url_of`] writes it) may be stored under besides itself: `url`
/// as the key of each cache route whose key is not the URL as sent reads it (without the host,
/// or with part of the query: [`super::keyed_url`]), each once. An invalidation (RFC 9111 §4.4) or a purge of `url` names them too, whichever
/// route it came through: a write through a route of its own (`methods = ["POST"]`), or a
/// `PURGE` route beside the cached one, reaches the cached route's copy.
/// Only the routes whose path could take `url`'s are asked (a route by `path` or
/// `path_prefix` of another path holds no object of it), unless its path has a `%` or a dot
/// segment, which the router may read otherwise than the bytes say.
fn keyed_urls(routes: &[Route], url: &[u8]) -> Vec<Vec<u8>> {
    use crate::router::PathMatch;
    let pq = super::hostless(url);
    let path = &pq[..memchr::memchr(b'?', pq).unwrap_or(pq.len())];
    let plain = memchr::memchr(b'%', path).is_none() && memchr::memmem::find(path, b"/.").is_none();
    let may_take = |r: &Route| match &r.path {
        PathMatch::Exact(e) if plain => path == &e[..],
        PathMatch::Prefix(x) if plain => path.starts_with(x),
        _ => true,
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    for r in routes.iter().filter(|r| may_take(r)) {
        let Some(p) = r.cache.as_deref() else {
            continue;
        };
        if let Some(k) = super::keyed_url(p, url) {
            if k != url && !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

/// A `Location` or `Content-Location` value as a URL of the request's host (§4.4: only
/// URIs of the same origin are invalidated).
fn same_host_url(head: &RequestHead, v: &[u8]) -> Option<Vec<u8>> {
    let v = crate::http::trim_ows(v);
    let (name, port) = super::key_host(head.host_bytes()?, head.https);
    let mut host = name.to_ascii_lowercase();
    host.extend_from_slice(port);
    let path = if v.starts_with(b"/") && !v.starts_with(b"//") {
        v
    } else {
        let (rest, https) = match v.strip_prefix(b"http://") {
            Some(rest) => (rest, false),
            None => (v.strip_prefix(b"https://")?, true),
        };
        let slash = rest.iter().position(|b| *b == b'/').unwrap_or(rest.len());
        let (name, port) = super::key_host(&rest[..slash], https);
        if !(name.len() + port.len() == host.len()
            && host[..name.len()].eq_ignore_ascii_case(&name)
            && host[name.len()..] == *port)
        {
            return None;
        }
        &rest[slash..]
    };
    let mut u = host;
    if path.is_empty() {
        u.push(b'/');
    }
    u.extend_from_slice(path);
    Some(u)
}

/// Writes an answer from a stored response: the client's conditionals (RFC 9110 §13.2.2)
/// and a single byte range (§14.2) are answered here; HEAD gets the head of the stored GET.
#[allow(clippy::too_many_arguments)]
async fn answer<'c, S: ClientIo>(
    w: &Worker,
    via: &[u8],
    route: &Route,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    o: &Object,
    now: u64,
    status: &Status<'_>,
) -> Outcome<'c> {
    let head_only = ctx.head.method == Method::Head;
    let mut code = o.status;
    let mut range: Option<(u64, u64)> = None;
    let len = o.body.len() as u64;
    // The representation's length, and where the stored body starts in it (a piece's range,
    // RFC 9111 §3.3; 0 for a whole response).
    let (mut total, mut from) = (len, 0);
    if (200..300).contains(&o.status) {
        code = preconditions(&ctx.head, o).unwrap_or(o.status);
        if code == o.status && o.status == 200 && !head_only {
            if let Some(r) = single_range(&ctx.head) {
                if if_range_holds(&ctx.head, o) {
                    match policy::byte_range(r, len) {
                        RangeAnswer::Full => {}
                        RangeAnswer::Part(a, b) => {
                            code = 206;
                            range = Some((a, b));
                        }
                        RangeAnswer::Unsatisfiable => code = 416,
                    }
                }
            }
        } else if code == 206 {
            // A stored piece, found for a range it holds ([`piece_for`]): that part. (Were
            // it not found, the piece would go as it was stored, its Content-Range with it.)
            std::hint::cold_path();
            if let Some((a, b, cr)) = piece_part(&ctx.head, o) {
                range = Some((a, b));
                (total, from) = (cr.complete, cr.first);
            }
        }
    }
    let keep = can_keep(c, ctx);
    let date = w.date.get();
    let wbuf = &mut ctx.wbuf;
    wbuf.clear();
    let reason: &[u8] = if code == o.status && !o.reason.is_empty() {
        &o.reason
    } else {
        reason_phrase(code).as_bytes()
    };
    put_status_line(wbuf, code, reason);
    let rules = &route.response_headers;
    let mut has_date = false;
    // A route whose `response_headers` name Date (set, add or remove) decides it, as on a
    // forwarded response: Date is one value (RFC 9110 §5.3), an added one replaces the stored.
    let route_date = rules.decides(b"date");
    let drops = rules.drops_any();
    // The stored lines, as received where they were stored from a head (copied in runs).
    o.fields.put_lines(wbuf, |n| {
        if (drops && rules.drops(n)) || (route_date && n.eq_ignore_ascii_case(b"date")) {
            return false;
        }
        let keep_field = match code {
            // §15.4.5: the fields a 200 would have carried for caches; and the stored
            // upstream Cache-Status members, before this cache's (RFC 9211 §2), on every
            // answer from the store.
            304 => [
                &b"cache-control"[..],
                b"content-location",
                b"date",
                b"etag",
                b"expires",
                b"vary",
                b"last-modified",
                b"cache-status",
            ]
            .iter()
            .any(|s| n.eq_ignore_ascii_case(s)),
            412 | 416 => n.eq_ignore_ascii_case(b"date") || n.eq_ignore_ascii_case(b"cache-status"),
            // The part's own Content-Range is written below (a piece stored one of its own).
            206 if range.is_some() => !n.eq_ignore_ascii_case(b"content-range"),
            _ => true,
        };
        has_date |= keep_field && n.eq_ignore_ascii_case(b"date");
        keep_field
    });
    // The stored Date, else this second's, unless the route decides it.
    if !has_date && !route_date {
        put_header(wbuf, b"date", &date);
    }
    wbuf.put_slice(b"age: ");
    // RFC 9111 §1.2.2: an age past 2^31 (an entry from a hostile Redis) is sent as 2^31.
    put_u64(wbuf, o.t.age(now).min(policy::MAX_DELTA));
    wbuf.put_slice(b"\r\n");
    status.put(wbuf);
    put_header(wbuf, b"via", via);
    put_header(wbuf, b"x-request-id", ctx.id.as_bytes());
    rules.put(wbuf);
    wbuf.put_slice(&ctx.resp_headers);
    let body = match (code, range) {
        (206, Some((a, b))) => {
            wbuf.put_slice(b"content-range: bytes ");
            put_u64(wbuf, a);
            wbuf.put_u8(b'-');
            put_u64(wbuf, b);
            wbuf.put_u8(b'/');
            put_u64(wbuf, total);
            wbuf.put_slice(b"\r\n");
            // (`from <= a <= b` and the part within the body: `piece_part` checked a piece.)
            let (a, b) = (
                a.saturating_sub(from) as usize,
                b.saturating_sub(from) as usize,
            );
            o.body
                .slice(a.min(o.body.len())..b.saturating_add(1).min(o.body.len()))
        }
        (416, _) => {
            wbuf.put_slice(b"content-range: bytes */");
            put_u64(wbuf, len);
            wbuf.put_slice(b"\r\n");
            Bytes::new()
        }
        (304 | 412, _) => Bytes::new(),
        _ => o.body.clone(),
    };
    let bodiless = code == 304 || code == 204 || (100..200).contains(&code);
    if !bodiless {
        wbuf.put_slice(b"content-length: ");
        put_u64(wbuf, body.len() as u64);
        wbuf.put_slice(b"\r\n");
    }
    if let Some(v) = connection_value(keep, ctx.head.version) {
        put_header(wbuf, b"connection", v);
    }
    wbuf.put_slice(b"\r\n");
    let send_body = !head_only && !bodiless && !body.is_empty();
    if send_body && body.len() <= INLINE_BODY {
        wbuf.put_slice(&body);
    }
    // What the end of the request records (metrics, access log).
    ctx.rec.status = code;
    ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(
        wbuf.len() as u64
            + if send_body && body.len() > INLINE_BODY {
                body.len() as u64
            } else {
                0
            },
    );
    let t = ctx.t.client_write;
    let buf = std::mem::take(&mut ctx.wbuf);
    match write_buf(&mut c.io, buf, t).await {
        Ok(mut b) => {
            b.clear();
            ctx.wbuf = b;
        }
        Err(_) => return Outcome::Abort,
    }
    if send_body && body.len() > INLINE_BODY && write_buf(&mut c.io, body, t).await.is_err() {
        return Outcome::Abort;
    }
    Outcome::Relayed {
        keep: drain_rest(w, c, ctx, keep).await,
    }
}

/// Whether a waiting request can take a response as it arrives: a plain GET (no
/// conditionals, no range, no freshness demands) whose Vary values are the fetcher's.
fn streamable(sent: &Sent<'_>, req: &Directives, st: &FlightStream) -> bool {
    let h = sent.head;
    h.method == Method::Get
        && req.max_age.is_none()
        && req.min_fresh.is_none()
        && ![
            &b"range"[..],
            b"if-none-match",
            b"if-modified-since",
            b"if-match",
            b"if-unmodified-since",
        ]
        .iter()
        .any(|n| h.header(n).is_some())
        && st.vary_matches(sent)
        // A body of unknown length goes out chunked: HTTP/1.1 clients only (RFC 9112 §7).
        && (st.len.is_some() || h.version == Version::Http11)
}

/// Answers a waiter with the response another request is fetching, its body written as it
/// arrives (woken by the fetch, no polling). A fetch that fails part way cuts this answer too.
#[allow(clippy::too_many_arguments)]
async fn stream_from<'c, S: ClientIo>(
    w: &Worker,
    via: &[u8],
    route: &Route,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    flight: &Rc<Flight>,
    st: &FlightStream,
    status: &Status<'_>,
) -> Outcome<'c> {
    // Counted from here (before any wait): a chunked body past the cut keeps its window
    // for the waiters streaming it.
    let _streaming = st.len.is_none().then(|| flight.stream_guard());
    let keep = can_keep(c, ctx);
    let wbuf = &mut ctx.wbuf;
    wbuf.clear();
    let reason: &[u8] = if st.reason.is_empty() {
        reason_phrase(st.status).as_bytes()
    } else {
        &st.reason
    };
    put_status_line(wbuf, st.status, reason);
    ctx.rec.status = st.status;
    let rules = &route.response_headers;
    st.fields.put_lines(wbuf, |n| !rules.drops(n));
    wbuf.put_slice(b"age: ");
    put_u64(wbuf, st.t.age(now_secs()).min(policy::MAX_DELTA));
    wbuf.put_slice(b"\r\n");
    status.put(wbuf);
    put_header(wbuf, b"via", via);
    put_header(wbuf, b"x-request-id", ctx.id.as_bytes());
    rules.put(wbuf);
    wbuf.put_slice(&ctx.resp_headers);
    let bodiless = st.status == 204;
    if !bodiless {
        match st.len {
            Some(n) => {
                wbuf.put_slice(b"content-length: ");
                put_u64(wbuf, n);
                wbuf.put_slice(b"\r\n");
            }
            None => wbuf.put_slice(b"transfer-encoding: chunked\r\n"),
        }
    }
    if let Some(v) = connection_value(keep, ctx.head.version) {
        put_header(wbuf, b"connection", v);
    }
    wbuf.put_slice(b"\r\n");
    let t = ctx.t.client_write;
    let head_len = wbuf.len() as u64;
    let buf = std::mem::take(&mut ctx.wbuf);
    match write_buf(&mut c.io, buf, t).await {
        Ok(mut b) => {
            b.clear();
            ctx.wbuf = b;
        }
        Err(_) => return Outcome::Abort,
    }
    // What the end of the request records (metrics, access log): the head, then each chunk.
    ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(head_len);
    if st.len.is_none() && !bodiless {
        return stream_chunked(c, ctx, flight, keep, w).await;
    }
    let total = if bodiless { 0 } else { st.len.unwrap_or(0) };
    let mut sent = 0u64;
    while sent < total {
        let chunk = flight.body_from(sent as usize);
        if !chunk.is_empty() {
            let take = chunk.len().min((total - sent) as usize);
            sent += take as u64;
            if write_buf(&mut c.io, chunk.slice(..take), t).await.is_err() {
                return Outcome::Abort;
            }
            ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(take as u64);
            continue;
        }
        if flight.end.get() != FlightEnd::Pending {
            // Ended without the rest: the fetch failed.
            return Outcome::Abort;
        }
        let notified = flight.done.notified();
        if monoio::time::timeout(ctx.t.upstream_body, notified)
            .await
            .is_err()
        {
            return Outcome::Abort;
        }
    }
    Outcome::Relayed {
        keep: drain_rest(w, c, ctx, keep).await,
    }
}

/// The body of a chunked fetch, to a waiter, as it arrives: each piece the fetch has
/// received becomes one chunk (RFC 9112 §7.1), and the last chunk is written only once the
/// fetch ended complete (`Stored`, or past the cut `body_end`: a body that outgrew
/// `max_object_bytes` is not stored, but still streamed whole). A fetch that fails, or a
/// waiter that falls more than the window (`max_object_bytes`) behind a body past the cut,
/// cuts this answer before its last chunk, so the client sees an incomplete message, never a
/// truncated one as complete.
async fn stream_chunked<'c, S: ClientIo>(
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    flight: &Flight,
    keep: bool,
    w: &Worker,
) -> Outcome<'c> {
    let t = ctx.t.client_write;
    let mut sent = 0usize;
    loop {
        let Some(piece) = flight.window_from(sent) else {
            // Past the cut, the bytes this waiter needs are no longer kept.
            return Outcome::Abort;
        };
        if !piece.is_empty() {
            sent = sent.saturating_add(piece.len());
            let mut frame = std::mem::take(&mut ctx.wbuf);
            frame.clear();
            put_hex(&mut frame, piece.len());
            frame.put_slice(b"\r\n");
            frame.put_slice(&piece);
            frame.put_slice(b"\r\n");
            let n = frame.len() as u64;
            match write_buf(&mut c.io, frame, t).await {
                Ok(mut b) => {
                    b.clear();
                    ctx.wbuf = b;
                }
                Err(_) => return Outcome::Abort,
            }
            ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(n);
            continue;
        }
        match flight.end.get() {
            FlightEnd::Pending => {}
            FlightEnd::Stored => break,
            FlightEnd::NotStorable if flight.body_end.get() => break,
            // Ended without a whole body: the fetch failed.
            FlightEnd::Failed | FlightEnd::NotStorable => return Outcome::Abort,
        }
        let notified = flight.done.notified();
        if monoio::time::timeout(ctx.t.upstream_body, notified)
            .await
            .is_err()
        {
            return Outcome::Abort;
        }
    }
    if write_buf(&mut c.io, Bytes::from_static(b"0\r\n\r\n"), t)
        .await
        .is_err()
    {
        return Outcome::Abort;
    }
    ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(5);
    Outcome::Relayed {
        keep: drain_rest(w, c, ctx, keep).await,
    }
}

/// `n` in lowercase hexadecimal, as a chunk size.
fn put_hex(out: &mut BytesMut, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.put_u8(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

/// The client's preconditions against a stored 2xx (RFC 9110 §13.2.2, in its order): the
/// status to answer instead (304 or 412), or `None` to answer the stored response.
fn preconditions(h: &RequestHead, o: &Object) -> Option<u16> {
    // Most requests ask nothing: one look at the names (the four are `If-` names of 8, 13, 17
    // and 19 bytes) instead of a look for each.
    let asks = h.headers.iter().any(|x| {
        let n = h.bytes(x.name);
        matches!(n.len(), 8 | 13 | 17 | 19) && n[..3].eq_ignore_ascii_case(b"if-")
    });
    if !asks {
        return None;
    }
    // The stored validators are read only for a request that asks about them (most ask
    // nothing: no date is parsed for them).
    // A list field's lines are one list (RFC 9110 §5.3): each of them is read.
    let lm = || o.last_modified().and_then(policy::parse_http_date);
    if h.header(b"if-match").is_some() {
        let etag = o.etag();
        let ok = h
            .header_values(b"if-match")
            .any(|im| policy::match_hits(im, etag));
        if !ok {
            return Some(412);
        }
    } else if let Some(ius) = one_line(h, b"if-unmodified-since").and_then(policy::parse_http_date)
    {
        if lm().is_none_or(|lm| lm > ius) {
            return Some(412);
        }
    }
    if h.header(b"if-none-match").is_some() {
        let etag = o.etag();
        if h.header_values(b"if-none-match")
            .any(|inm| policy::none_match_hits(inm, etag))
        {
            return Some(304);
        }
    } else if let Some(ims) = one_line(h, b"if-modified-since").and_then(policy::parse_http_date) {
        // RFC 9111 §4.3.2: without Last-Modified, the stored Date (or the time it was
        // received) stands in for it.
        let lm_or_date = lm().unwrap_or_else(|| {
            policy::field(&o.fields, b"date")
                .and_then(policy::parse_http_date)
                .unwrap_or(o.t.response_time)
        });
        if lm_or_date <= ims {
            return Some(304);
        }
    }
    None
}

/// `If-Range` (RFC 9110 §13.1.5): the range applies only when the validator matches
/// strongly (an entity tag) or exactly (a date equal to a strong Last-Modified).
fn if_range_holds(h: &RequestHead, o: &Object) -> bool {
    let Some(v) = h.header(b"if-range") else {
        return true;
    };
    let v = crate::http::trim_ows(v);
    if v.starts_with(b"\"") || v.starts_with(b"W/") {
        return o.etag().is_some_and(|e| policy::strong_match(v, e));
    }
    // A date validates only when it is strong (§13.1.5, §8.8.2.2): the stored response's
    // Date at least a second after its Last-Modified (else the representation may have
    // changed within that second).
    let date = || {
        policy::field(&o.fields, b"date")
            .and_then(policy::parse_http_date)
            .unwrap_or(o.t.response_time)
    };
    match (
        policy::parse_http_date(v),
        o.last_modified().and_then(policy::parse_http_date),
    ) {
        (Some(a), Some(b)) => a == b && date() > b,
        _ => false,
    }
}

/// The request's `Range` when it came as one field line. Several lines combine into one
/// value (RFC 9110 §5.3), `bytes=0-1, bytes=3-4`, which is not a valid ranges-specifier:
/// ignored as any invalid `Range` is (§14.2), the whole representation answered, and
/// `If-Range` with it (§13.1.5: it goes with a Range the server would honour).
fn single_range(h: &RequestHead) -> Option<&[u8]> {
    one_line(h, b"range")
}

/// The value of the request's field `name` when it came as one line. A date field
/// (`If-Modified-Since`, `If-Unmodified-Since`) on several lines is a list of dates, which
/// RFC 9110 §13.1.3 and §13.1.4 say to ignore, as an invalid date is.
fn one_line<'h>(h: &'h RequestHead, name: &'h [u8]) -> Option<&'h [u8]> {
    let mut lines = h.header_values(name);
    let first = lines.next()?;
    lines.next().is_none().then_some(first)
}

// ---------------------------------------------------------------------------------------------
// Pieces: 206 responses stored (RFC 9111 §3.3) and ranges served from them (RFC 9110 §14.2).
//
// A piece is stored as any response is (the same analysis, freshness, Vary, purges,
// invalidations, byte budget and `max_object_bytes`), under its own key: the request's key
// with its first byte `p` instead of the `u` every [`build_key`] key starts with, so that no
// lookup for a whole response ever finds one, and a whole response stored for the URL is found
// first (it answers any range). One piece per key and Vary values: a newer one replaces it.
// Pieces are looked for only by a GET with one `Range` line that nothing whole answers, once
// the worker has stored one ([`WorkerCache::has_pieces`]); they are not shared through Redis.

/// The key of the pieces stored for the request key `k` (see above).
fn piece_key(k: &[u8]) -> Vec<u8> {
    debug_assert_eq!(k.first(), Some(&b'u'));
    let mut pk = k.to_vec();
    if let Some(first) = pk.first_mut() {
        *first = b'p';
    }
    pk
}

/// The range of a 206 that may be stored as a piece (RFC 9111 §3.3; RFC 9110 §14.4, §15.3.7):
/// the answer to a GET with one `Range` line, with one `Content-Range` line that names a
/// whole range of a representation of known length ([`policy::content_range`]) exactly as
/// long as the body (its Content-Length: a chunked or close-delimited one is not stored), and
/// not `multipart/byteranges` (several ranges, §14.6). `Err`: why not, for `Cache-Status`.
fn piece_range(
    req: &RequestHead,
    resp: &ResponseHead,
) -> Result<policy::ContentRange, &'static str> {
    if req.method != Method::Get || single_range(req).is_none() {
        return Err("status");
    }
    let mut lines = resp
        .headers
        .iter()
        .filter(|h| resp.bytes(h.name).eq_ignore_ascii_case(b"content-range"))
        .map(|h| resp.bytes(h.value));
    let (Some(v), None) = (lines.next(), lines.next()) else {
        return Err("content-range");
    };
    let cr = policy::content_range(v).ok_or("content-range")?;
    if known_len(resp) != Some(cr.bytes()) {
        return Err("content-range");
    }
    let multipart = resp.header(b"content-type").is_some_and(|t| {
        let t = crate::http::trim_ows(t);
        t.get(..20)
            .is_some_and(|m| m.eq_ignore_ascii_case(b"multipart/byteranges"))
    });
    if multipart {
        return Err("content-range");
    }
    Ok(cr)
}

/// Stores a 206 whose body came whole with its head as a piece, when it may be: the range
/// ([`piece_range`]), the analysis ([`analyze_piece`]), the object and its store
/// ([`store_piece`]), or why not (for `Cache-Status`, see [`Status::note_kept`]).
#[allow(clippy::too_many_arguments)]
#[cold]
#[inline(never)]
fn piece_whole(
    p: &RoutePolicy,
    cache: &WorkerCache,
    resp: &ResponseHead,
    ch: &Chosen,
    req: &Directives,
    sent: &Sent<'_>,
    keys: &Keys<'_>,
    authorized: bool,
    request_time: u64,
    now: u64,
) -> Result<(), &'static str> {
    if req.no_store {
        return Err("request-no-store");
    }
    let cr = piece_range(sent.head, resp)?;
    if cr.bytes() > p.max_object {
        return Err("too-large");
    }
    let body = usize::try_from(cr.bytes())
        .ok()
        .and_then(|n| ch.up.rbuf.get(..n))
        .ok_or("status")?;
    let mut s = analyze_piece(
        p,
        resp,
        sent.head,
        cache,
        Ok(body),
        authorized,
        request_time,
        now,
    )?;
    let k = keys.store_key(p, s.public).ok_or("no-consumer")?;
    let vary = vary_values(&s.vary, sent);
    let body = std::mem::take(&mut s.body).freeze();
    let obj = build_object(cache, &mut s, 206, reason_of(resp), body, vary);
    store_piece(cache, p, keys, &piece_key(k), obj, cr)
}

/// Stores the piece `obj` (of the range `cr`) under the piece key `k`, unless its body is not
/// that range's length or a purge or invalidation applied since the fetch began covers it (as
/// [`store_object`]); not in Redis. Combined first with the piece stored for the same Vary
/// values when both are of one representation ([`combine_pieces`], RFC 9111 §3.4); a
/// combination that holds the whole representation is stored as the complete 200 it is, under
/// the request's key (RFC 9110 §15.3.7.3).
fn store_piece(
    cache: &WorkerCache,
    p: &RoutePolicy,
    keys: &Keys<'_>,
    k: &[u8],
    obj: Rc<Object>,
    cr: policy::ContentRange,
) -> Result<(), &'static str> {
    if obj.body.len() as u64 != cr.bytes() {
        return Err("content-range");
    }
    match cache.purged_since(keys.purges.get(), &obj) {
        None => {}
        Some(true) => obj.invalid.set(true),
        Some(false) => return Err("invalidated"),
    }
    let stored = cache.get(k).unwrap_or_default();
    let older = stored.iter().find(|o| o.vary == obj.vary);
    let (obj, cr) = match older.and_then(|o| combine_pieces(cache, p, o, &obj, cr)) {
        Some(combined) => combined,
        None => {
            // Apart from a fresh, larger piece of the same representation, a smaller one does
            // not replace it (a client probing a few bytes would evict what answers more).
            let larger = older.filter(|o| {
                o.body.len() > obj.body.len()
                    && o.is_fresh(now_secs())
                    && same_representation(o, &obj, cr).is_some()
            });
            if larger.is_some() {
                return Err("smaller-piece");
            }
            (obj, cr)
        }
    };
    if cr.first == 0 && cr.bytes() == cr.complete {
        let whole = whole_of_piece(cache, &obj).ok_or("too-large")?;
        let mut full = k.to_vec();
        full[0] = b'u';
        return store_object(cache, p, keys, &full, whole);
    }
    cache.insert(k, obj, p.max_variants);
    cache.note_piece();
    Ok(())
}

/// The piece `new` (of the range `cr`) combined with the stored piece `old` of the same key
/// and Vary values (RFC 9111 §3.4, RFC 9110 §15.3.7.3): when both carry the same strong
/// entity tag and the same complete length, neither is soft-purged, their ranges overlap or
/// meet, and the union is within `max_object_bytes`. The union's bytes (the new response's
/// where both have them), the new response's fields with those only the older had (§3.2,
/// Content-Range for the union), status, timing and surrogate keys. `None`: not combined
/// (the new piece replaces the older).
fn combine_pieces(
    cache: &WorkerCache,
    p: &RoutePolicy,
    old: &Object,
    new: &Object,
    cr: policy::ContentRange,
) -> Option<(Rc<Object>, policy::ContentRange)> {
    let oc = same_representation(old, new, cr)?;
    // (`last < complete`: `last + 1` does not overflow.)
    let meet = oc.first <= cr.last + 1 && cr.first <= oc.last + 1;
    if !meet || old.invalid.get() || new.invalid.get() {
        return None;
    }
    let union = policy::ContentRange {
        first: oc.first.min(cr.first),
        last: oc.last.max(cr.last),
        complete: cr.complete,
    };
    if union.bytes() > p.max_object {
        return None;
    }
    let mut body = BytesMut::with_capacity(usize::try_from(union.bytes()).ok()?);
    if oc.first < cr.first {
        body.extend_from_slice(old.body.get(..usize::try_from(cr.first - oc.first).ok()?)?);
    }
    body.extend_from_slice(&new.body);
    if oc.last > cr.last {
        body.extend_from_slice(
            old.body
                .get(usize::try_from(cr.last + 1 - oc.first).ok()?..)?,
        );
    }
    if body.len() as u64 != union.bytes() {
        return None;
    }
    let value = format!("bytes {}-{}/{}", union.first, union.last, union.complete);
    let is_cr = |n: &[u8]| n.eq_ignore_ascii_case(b"content-range");
    let has = |n: &[u8]| new.fields.iter().any(|(m, _)| m.eq_ignore_ascii_case(n));
    let fields = Fields::from_pairs(
        new.fields
            .iter()
            .filter(|(n, _)| !is_cr(n))
            .chain(old.fields.iter().filter(|(n, _)| !is_cr(n) && !has(n)))
            .chain(std::iter::once((&b"content-range"[..], value.as_bytes()))),
    )?;
    // The surrogate keys of both (§3.4 keeps the newer's fields, but the bytes are both
    // responses'): a purge by either tag takes the combination.
    let mut tags = new.tags.clone();
    for t in &old.tags {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    // As many as one response may give (past that, not combined: the newer replaces).
    if tags.len() > super::MAX_TAGS {
        return None;
    }
    let obj = cache.new_object(|o| {
        put_parts(
            o,
            206,
            new.reason.clone(),
            fields,
            body.freeze(),
            new.t,
            new.url.clone(),
            tags,
            new.vary.clone(),
        )
    });
    obj.invalid.set(new.invalid.get());
    Some((obj, union))
}

/// The range of the stored piece `old` when it and `new` (of the range `cr`) are pieces of one
/// representation: the same strong entity tag and the same complete length (RFC 9110
/// §15.3.7.3, §8.8.3).
fn same_representation(
    old: &Object,
    new: &Object,
    cr: policy::ContentRange,
) -> Option<policy::ContentRange> {
    let oc = policy::content_range(policy::field(&old.fields, b"content-range")?)?;
    let same = matches!((old.etag(), new.etag()), (Some(a), Some(b)) if policy::strong_match(a, b));
    (same && oc.complete == cr.complete).then_some(oc)
}

/// The complete 200 that a piece holding the whole representation is (RFC 9110 §15.3.7.3):
/// its fields without Content-Range, its body (then as long as its Content-Length says).
fn whole_of_piece(cache: &WorkerCache, piece: &Object) -> Option<Rc<Object>> {
    let fields = Fields::from_pairs(
        piece
            .fields
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(b"content-range")),
    )?;
    let obj = cache.new_object(|o| {
        put_parts(
            o,
            200,
            Bytes::from_static(reason_phrase(200).as_bytes()),
            fields,
            piece.body.clone(),
            piece.t,
            piece.url.clone(),
            piece.tags.clone(),
            piece.vary.clone(),
        )
    });
    obj.invalid.set(piece.invalid.get());
    Some(obj)
}

/// The part of the stored piece `o` that the request's range asks for, in the
/// representation's bytes, with the piece's range: when the request has one `Range` line
/// (GET), its `If-Range` holds against the piece (§13.1.5), and the one range it names, taken
/// against the representation's length, lies wholly inside the piece. `None` otherwise: the
/// piece cannot answer (the request goes upstream).
fn piece_part(h: &RequestHead, o: &Object) -> Option<(u64, u64, policy::ContentRange)> {
    let r = single_range(h)?;
    let cr = policy::content_range(policy::field(&o.fields, b"content-range")?)?;
    if !if_range_holds(h, o) {
        return None;
    }
    match policy::byte_range(r, cr.complete) {
        RangeAnswer::Part(a, b) if cr.covers(a, b) => Some((a, b, cr)),
        _ => None,
    }
}

/// A stored piece that answers the request (a GET with one `Range` line) now: fresh, or stale
/// as the client allows, and holding the range it asks for ([`piece_part`]).
#[cold]
#[inline(never)]
fn piece_for(
    cache: &WorkerCache,
    sent: &Sent<'_>,
    keys: &Keys<'_>,
    req: &Directives,
    now: u64,
) -> Option<Rc<Object>> {
    let h = sent.head;
    if h.method != Method::Get || single_range(h).is_none() {
        return None;
    }
    let own = keys.own.as_deref();
    for k in std::iter::once(&keys.shared[..]).chain(own) {
        let pk = piece_key(k);
        let (Some(o), _) = cache.lookup(cache.key(&pk), sent) else {
            continue;
        };
        if matches!(usable(&o, req, now), Use::Fresh | Use::StaleOk) && piece_part(h, &o).is_some()
        {
            return Some(o);
        }
    }
    None
}

/// A stored piece that a GET without `Range` may complete (RFC 9111 §3.4), when nothing whole
/// is stored for it: fresh for the request, of its Vary values, and one whose rest may be
/// asked for ([`completion_of`]). Not for a request with `no-store` (nothing would be stored).
#[cold]
#[inline(never)]
fn piece_to_complete(
    cache: &WorkerCache,
    sent: &Sent<'_>,
    keys: &Keys<'_>,
    req: &Directives,
    p: &RoutePolicy,
    now: u64,
) -> Option<Rc<Object>> {
    let h = sent.head;
    if h.method != Method::Get || h.header(b"range").is_some() || req.no_store {
        return None;
    }
    let own = keys.own.as_deref();
    for k in std::iter::once(&keys.shared[..]).chain(own) {
        let pk = piece_key(k);
        let (Some(o), _) = cache.lookup(cache.key(&pk), sent) else {
            continue;
        };
        if usable(&o, req, now) == Use::Fresh && completion_of(&o, p).is_some() {
            return Some(o);
        }
    }
    None
}

/// The range of a piece whose rest may be asked for, and its entity tag: it starts at byte 0
/// and stops short of the end, its complete length is within `max_object_bytes` (the whole is
/// stored), and its `ETag` is strong (RFC 9110 §13.1.5: `If-Range` takes a strong one; §8.8.1).
fn completion_of<'o>(o: &'o Object, p: &RoutePolicy) -> Option<(policy::ContentRange, &'o [u8])> {
    let cr = policy::content_range(policy::field(&o.fields, b"content-range")?)?;
    let etag = o.etag().filter(|e| policy::strong_match(e, e))?;
    let short = cr.first == 0 && cr.last + 1 < cr.complete && cr.complete <= p.max_object;
    short.then_some((cr, etag))
}

/// The request head for the rest of a piece (RFC 9111 §3.4): the client's (which has no
/// `Range`), its `If-Range` dropped, with `Range: bytes=<from>-` and `If-Range: <etag>`
/// (RFC 9110 §14.2, §13.1.5: the rest of this representation, or the whole of a newer one).
/// `None` when it cannot be built within limits.
fn rest_head(
    orig: &RequestHead,
    from: u64,
    etag: &[u8],
    limits: &crate::http::request::Limits,
    head: RequestHead,
) -> Option<RequestHead> {
    let add = |raw: &mut BytesMut| {
        raw.put_slice(b"range: bytes=");
        put_u64(raw, from);
        raw.put_slice(b"-\r\n");
        put_header(raw, b"if-range", etag);
    };
    upstream_get(
        orig,
        &[b"if-range", b"range"],
        etag.len() + 64,
        add,
        limits,
        head,
    )
}

/// The length of the rest when `resp` (to the request `sent`, made by [`rest_head`]) is the
/// rest of the piece of range `cr` and tag `etag`: a 206 with one `Content-Range` of exactly
/// `b+1 .. N-1 / N`, a Content-Length that agrees ([`piece_range`]), and the same strong
/// `ETag` (RFC 9110 §15.3.7.3: only then are they parts of one representation).
fn rest_len(
    sent: &RequestHead,
    resp: &ResponseHead,
    cr: policy::ContentRange,
    etag: &[u8],
) -> Option<usize> {
    if resp.status != 206 {
        return None;
    }
    let got = piece_range(sent, resp).ok()?;
    let mut tags = resp
        .headers
        .iter()
        .filter(|h| resp.bytes(h.name).eq_ignore_ascii_case(b"etag"))
        .map(|h| resp.bytes(h.value));
    let same_tag = matches!((tags.next(), tags.next()), (Some(t), None) if policy::strong_match(crate::http::trim_ows(t), etag));
    let rest =
        got.first == cr.last + 1 && got.last + 1 == cr.complete && got.complete == cr.complete;
    let length = matches!(resp.body, RespBody::Length(n) if n == got.bytes());
    if !(same_tag && rest && length) {
        return None;
    }
    usize::try_from(got.bytes()).ok()
}

/// Reads the upstream body on until `n` bytes of it are in `up.rbuf`, within the upstream
/// body timeouts. Whether they are.
async fn read_to(up: &mut UpConn, n: usize, t: &Timeouts) -> bool {
    let started = Instant::now();
    let total = t.upstream_body_total.unwrap_or(Duration::from_secs(60));
    while up.rbuf.len() < n {
        let left = total.saturating_sub(started.elapsed()).min(t.upstream_body);
        let want = (n - up.rbuf.len()).min(UPSTREAM_READ_BUF);
        if read_some(&mut up.stream, &mut up.rbuf, want, left)
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

/// How [`complete`] ended.
enum Completion<'c> {
    /// The request is answered (or failed) here.
    Done(Outcome<'c>),
    /// The request goes upstream whole, as the usual miss, with the flight's guard and the
    /// time it goes.
    Whole(Option<FlightGuard>, u64),
}

/// A GET without `Range` that no whole response answers, with a fresh stored piece from byte 0
/// ([`piece_to_complete`]): the piece is completed (RFC 9111 §3.4). The rest is asked for with
/// `Range: bytes=<b+1>-` and `If-Range: <its ETag>` ([`rest_head`]); a 206 that is exactly that
/// rest ([`rest_len`]), read whole, is combined with the piece into the whole 200, stored
/// ([`store_piece`], [`combine_pieces`]) and answered from the store (`Cache-Status`
/// `fwd=partial`, RFC 9211 §2.2; the flight's waiters find it). A 206 that is not, or a 416
/// (answers to the range the cache added, not to the client's request), never reaches the
/// client: it is dropped with its connection, and the request goes upstream as the usual miss
/// ([`Completion::Whole`]: its caller runs [`fill`]); so it does when the combination cannot
/// be stored or the rest cannot be asked for, and when the answer is invalid (a head the
/// exchange refused, a 304 to no conditional of the client's). Any other answer (a 200, a
/// 5xx, a failure to reach the upstream) is the usual miss's ([`fetched`]): relayed, and
/// stored when it may be.
/// `Cache-Status` says `fwd=partial` whichever way it goes: the cache had a partial response.
#[allow(clippy::too_many_arguments)]
#[cold]
#[inline(never)]
async fn complete<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    route: &Route,
    p: &RoutePolicy,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    keys: &Keys<'_>,
    mut guard: Option<FlightGuard>,
    req: &Directives,
    authorized: bool,
    request_time: u64,
    piece: Rc<Object>,
) -> Completion<'c> {
    let cache = &w.cache;
    let limits = cfg
        .listener_limits
        .get(c.info.listener)
        .unwrap_or(&cfg.limits);
    // The rest is read whole before it is stored: held against the in-flight bound as a
    // capture is (when it does not fit, the usual miss streams the whole through).
    let built = completion_of(&piece, p).and_then(|(cr, etag)| {
        let charge = cache.charge_in_flight(cr.complete - cr.last - 1)?;
        let h = rest_head(&ctx.head, cr.last + 1, etag, limits, w.bufs.take_head())?;
        Some((cr, etag, h, charge))
    });
    let Some((cr, etag, h, charge)) = built else {
        return Completion::Whole(guard, request_time);
    };
    let orig = std::mem::replace(&mut ctx.head, h);
    let mut resp = w.bufs.take_resp();
    let r = forward::exchange(w, cfg, route, group, c, ctx, &mut resp).await;
    if r.is_ok() {
        drop_forged_members(p, &mut resp);
    }
    let now = now_secs();
    let mut status = Status::new(p, PARTIAL_FWD);
    let r = match r {
        Ok(mut ch) if resp.status == 206 || resp.status == 416 => {
            let rest = rest_len(&ctx.head, &resp, cr, etag);
            let mut kept = false;
            let mut reusable = false;
            if let Some(n) = rest {
                if read_to(&mut ch.up, n, &ctx.t).await {
                    let sent = sent(cfg, route, c, ctx);
                    kept = piece_whole(
                        p,
                        cache,
                        &resp,
                        &ch,
                        req,
                        &sent,
                        keys,
                        authorized,
                        request_time,
                        now,
                    )
                    .is_ok();
                    let _ = ch.up.rbuf.split_to(n);
                    reusable = resp.keep_alive && ch.up.rbuf.is_empty();
                }
            }
            drop(charge);
            // (Not reusable: a 206 not read to its end, or a 416, whose body is not read.)
            let h = std::mem::replace(&mut ctx.head, orig);
            w.bufs.give_head(h);
            resp.raw = Bytes::new();
            release(w, group, ch, false, reusable);
            w.bufs.give_resp(resp);
            if kept {
                let (whole, _) = keys.lookup(cache, &sent(cfg, route, c, ctx));
                let whole = whole
                    .map(|h| h.obj)
                    .filter(|o| o.status == 200 && usable(o, req, now) == Use::Fresh);
                if let Some(o) = whole {
                    if let Some(g) = guard.take() {
                        g.finish(FlightEnd::Stored);
                    }
                    status.fwd_status = 206;
                    status.stored = true;
                    return Completion::Done(
                        answer(w, &cfg.via, route, c, ctx, &o, now, &status).await,
                    );
                }
            }
            return Completion::Whole(guard, now_secs());
        }
        // The rest's answer was invalid: a head the exchange refused (one with both
        // `Transfer-Encoding` and `Content-Length`, RFC 9112 §6.3; its connection dropped
        // there), or a 304 the rest request asked no question for (RFC 9110 §15.4.5). It
        // answers the request the cache made, not the client's: the whole is fetched
        // instead, as for a 206 that is not the rest. (A failure to reach the upstream or a
        // timeout is the usual miss's: a second trip would meet it again.)
        Ok(ch) if resp.status == 304 && !preconditioned(&ctx.head) => {
            Err(unasked_304(w, group, ch, &mut resp))
        }
        r => r,
    };
    if matches!(r, Err(AttemptError::Bad)) {
        drop(charge);
        let h = std::mem::replace(&mut ctx.head, orig);
        w.bufs.give_head(h);
        w.bufs.give_resp(resp);
        return Completion::Whole(guard, now_secs());
    }
    drop(charge);
    let h = std::mem::replace(&mut ctx.head, orig);
    w.bufs.give_head(h);
    let mode = Fetch::Fill {
        keys,
        stale: None,
        guard,
        req,
        authorized,
        request_time,
    };
    let out = fetched(
        w,
        cfg,
        route,
        p,
        group,
        c,
        ctx,
        mode,
        &mut status,
        r,
        &mut resp,
        false,
        request_time,
        now,
    )
    .await;
    w.bufs.give_resp(resp);
    Completion::Done(out)
}

/// A small answer made by the cache itself (504 for `only-if-cached`, PURGE results).
async fn gateway_answer<'c, S: ClientIo>(
    w: &Worker,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    code: u16,
    status: &Status<'_>,
) -> Outcome<'c> {
    gateway_body(w, c, ctx, code, status, b"").await
}

async fn gateway_body<'c, S: ClientIo>(
    w: &Worker,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    code: u16,
    status: &Status<'_>,
    body: &[u8],
) -> Outcome<'c> {
    let keep = can_keep(c, ctx);
    let date = w.date.get();
    let wbuf = &mut ctx.wbuf;
    wbuf.clear();
    put_status_line(wbuf, code, reason_phrase(code).as_bytes());
    status.put(wbuf);
    if !body.is_empty() {
        put_header(wbuf, b"content-type", b"application/json");
    }
    wbuf.put_slice(b"content-length: ");
    put_u64(wbuf, body.len() as u64);
    wbuf.put_slice(b"\r\n");
    end_head(
        wbuf,
        &date,
        ctx.id.as_bytes(),
        &ctx.resp_headers,
        keep,
        ctx.head.version,
    );
    if ctx.head.method != Method::Head {
        wbuf.put_slice(body);
    }
    ctx.rec.status = code;
    ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(wbuf.len() as u64);
    let buf = std::mem::take(&mut ctx.wbuf);
    match write_buf(&mut c.io, buf, ctx.t.client_write).await {
        Ok(mut b) => {
            b.clear();
            ctx.wbuf = b;
            Outcome::Relayed {
                keep: drain_rest(w, c, ctx, keep).await,
            }
        }
        Err(_) => Outcome::Abort,
    }
}

/// Whether the connection can go on after an answer the cache makes itself (a hit, a
/// PURGE result, a 504): the request's body must end first, since the next request starts
/// right after it (RFC 9112 §6.3, §9.3). A body already read whole is fine; one the cache does
/// not read is thrown away, within the connection's drain bounds (`DRAIN_MAX` bytes and
/// `DRAIN_TIMEOUT`, as for the gateway's other answers): what of it is buffered is taken
/// now, and a known rest over the bound, a malformed body, or a client still waiting for
/// `100 Continue` closes the connection instead. Called before the answer is written (it
/// decides `Connection: close`); [`drain_rest`] after.
fn can_keep<S>(c: &mut Conn<S>, ctx: &mut RequestCtx<'_>) -> bool {
    if !ctx.head.keep_alive || ctx.last_answer() {
        return false;
    }
    if ctx.body.is_done() {
        return true;
    }
    ctx.body.drainable()
        && match ctx.body.take(&mut c.rbuf) {
            Err(_) => false,
            Ok(_) => ctx.body.is_done() || ctx.body.left() <= DRAIN_MAX,
        }
}

/// After the answer: reads and throws away the rest of the body (see [`can_keep`]); whether
/// the connection goes on.
async fn drain_rest<S: ClientIo>(
    w: &Worker,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    keep: bool,
) -> bool {
    keep && (ctx.body.is_done() || c.drain(w, ctx).await)
}

/// `PURGE <target>` on a route with `purge = true` (its auth policy already passed): the URL
/// (host and target), or with a trailing `*` every URL under that prefix; with a
/// `Surrogate-Key` request header, the objects tagged with those keys instead. `Purge-Mode:
/// soft` marks them stale rather than removing them. Reaches every worker.
async fn purge_request<'c, S: ClientIo>(
    w: &Worker,
    p: &RoutePolicy,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
) -> Outcome<'c> {
    if let Some(who) = &p.purgers {
        let name = ctx.identity.consumer_name();
        if !who.iter().any(|n| Some(&**n) == name) {
            // Read access is not purge access: only the listed consumers may purge.
            let s = Status {
                detail: Some("purge-forbidden"),
                ..Status::new(p, "bypass")
            };
            let body = br#"{"error":"purge_forbidden","message":"this consumer may not purge on this route"}"#;
            return gateway_body(w, c, ctx, 403, &s, body).await;
        }
    }
    let soft = ctx
        .head
        .header(b"purge-mode")
        .is_some_and(|v| crate::http::trim_ows(v).eq_ignore_ascii_case(b"soft"));
    let mut targets: Vec<PurgeTarget> = ctx
        .head
        .header_values(b"surrogate-key")
        .flat_map(|v| v.split(|b| *b == b' ' || *b == b'\t'))
        .filter(|t| !t.is_empty())
        .take(64)
        .map(|t| PurgeTarget::Tag(t.to_vec()))
        .collect();
    if targets.is_empty() {
        let mut url = Vec::new();
        url_of(&ctx.head, &mut url);
        if url.ends_with(b"*") {
            url.pop();
            // The objects of a `key.ignore_host` route are stored without a host.
            let snapshot = w.config();
            let routes = &snapshot.router.routes;
            if routes
                .iter()
                .any(|r| r.cache.as_ref().is_some_and(|p| p.ignore_host))
            {
                targets.push(PurgeTarget::Prefix(super::hostless(&url).to_vec()));
            }
            targets.push(PurgeTarget::Prefix(url));
        } else {
            // Also the URL as the key of each route whose key is not the URL as sent reads it:
            // where their objects of it are stored.
            let snapshot = w.config();
            let keyed = keyed_urls(&snapshot.router.routes, &url);
            targets.extend(keyed.into_iter().map(PurgeTarget::Url));
            targets.push(PurgeTarget::Url(url));
        }
    }
    let mut n = 0u64;
    for target in targets {
        n = n.saturating_add(w.cache.purge_everywhere(Purge { target, soft }));
    }
    let body = format!(
        "{{\"purged\":{n},\"mode\":\"{}\",\"scope\":\"this worker counted, all workers purged\"}}",
        if soft { "soft" } else { "hard" }
    );
    let s = Status {
        detail: Some("purge"),
        ..Status::new(p, "bypass")
    };
    gateway_body(w, c, ctx, 200, &s, body.as_bytes()).await
}

/// Serves stale now and revalidates in a task of its own (RFC 5861 §3): the client is not
/// kept waiting. One revalidation per key at a time (it holds the key's flight).
#[allow(clippy::too_many_arguments)]
fn revalidate_later<S: ClientIo>(
    w: &Worker,
    cfg: &Snapshot,
    p: &RoutePolicy,
    group_idx: usize,
    c: &Conn<S>,
    ctx: &RequestCtx<'_>,
    keys: &Keys,
    f: &Found,
) {
    let cache = w.cache.clone();
    let Some(guard) = cache.begin_flight(&keys.shared) else {
        return;
    };
    let limits = cfg
        .listener_limits
        .get(c.info.listener)
        .unwrap_or(&cfg.limits);
    // No validators: a GET for it whole, without the client's conditionals and `Range` (the
    // client's own head was sent: a HEAD's answer was read as a GET's, waiting for a body
    // that never comes while it held the key's flight; `If-Match` or `Range` made it a 412
    // or 206 that replaces nothing).
    let Some(head) = conditional_head(&ctx.head, &f.obj, limits, RequestHead::default())
        .or_else(|| revalidation_head(&ctx.head, None, None, limits, RequestHead::default()))
    else {
        return;
    };
    let Some(route_idx) = ctx.route else { return };
    let job = Revalidation {
        cache,
        snap: w.config(),
        route_idx,
        group_idx,
        head,
        key: f.key.clone(),
        obj: f.obj.clone(),
        peer: c.peer.as_bytes().to_vec(),
        identity: Bytes::copy_from_slice(&ctx.auth_headers),
        client_cert: cert_of(cfg, c).map(|(n, v)| (n.into(), v.into())),
        private_ok: keys.store_key(p, false) == Some(&f.key[..]),
        request_id: ctx.id.as_bytes().to_vec(),
        https: c.info.tls,
        port: c.info.port,
        trusted: c.info.trusted,
        t: ctx.t,
        authorized: ctx.head.header(b"authorization").is_some(),
        max_variants: p.max_variants,
        trace: ctx.rec.trace,
        purges: keys.purges.get(),
    };
    monoio::spawn(async move {
        let stored = job.run().await;
        guard.finish(if stored {
            FlightEnd::Stored
        } else {
            FlightEnd::Failed
        });
    });
}

/// A header's name and value, owned.
type HeaderLine = (Box<[u8]>, Box<[u8]>);

/// A background revalidation: everything it needs, owned.
struct Revalidation {
    cache: Rc<WorkerCache>,
    snap: Rc<Snapshot>,
    route_idx: usize,
    group_idx: usize,
    head: RequestHead,
    key: Vec<u8>,
    obj: Rc<Object>,
    peer: Vec<u8>,
    identity: Bytes,
    /// The mTLS subject header's name and value the request sent upstream: the revalidation
    /// sends them too, and its Vary values are taken with them.
    client_cert: Option<HeaderLine>,
    /// A response that is not public may be stored under `key` (the key is the caller's own,
    /// or the route keeps no entries per caller): otherwise only a public one replaces the
    /// stale copy, as a request's own fetch would store it.
    private_ok: bool,
    request_id: Vec<u8>,
    https: bool,
    port: Option<u16>,
    /// The client is a trusted proxy (`server.trusted_proxies`): the revalidation forwards
    /// its forwarding fields as the request did, and takes its Vary values the same way (else
    /// the answer is stored under values no request from that proxy computes).
    trusted: bool,
    t: Timeouts,
    authorized: bool,
    max_variants: usize,
    /// The triggering request's trace context (W3C Trace Context).
    trace: crate::trace::TraceContext,
    /// The worker's purge count before the revalidation was sent ([`Keys::purges`]).
    purges: u64,
}

impl Revalidation {
    /// `true` when the store was updated.
    async fn run(self) -> bool {
        let Some(route) = self.snap.router.routes.get(self.route_idx) else {
            return false;
        };
        let Some(p) = route.cache.as_deref() else {
            return false;
        };
        let Some(group) = self.snap.upstreams.get(self.group_idx) else {
            return false;
        };
        let Some(ep) = group.pick(None, &[]) else {
            return false;
        };
        let traceparent = self.trace.traceparent();
        let fwd = Forwarding {
            peer_ip: &self.peer,
            trusted: self.trusted,
            port: self.port,
            request_id: &self.request_id,
            via: &self.snap.via,
            https: self.https,
            client_cert: self.client_cert.as_ref().map(|(n, v)| (&n[..], &v[..])),
            identity: &self.identity,
            // The triggering request's trace, the gateway's span as the parent, as when the
            // request itself is forwarded (see `crate::trace`).
            traceparent: Some(&traceparent),
            keep_tracestate: self.trace.keep_state,
        };
        let mut ubuf = BytesMut::new();
        encode_upstream_head(
            &mut ubuf,
            &self.head,
            route,
            &group.endpoints[ep].authority,
            &fwd,
        );
        let opts = AttemptOpts {
            head_request: false,
            allow_pool: true,
            verify: true,
            t: self.t,
        };
        let stats = &group.stats[ep];
        stats.outstanding.set(stats.outstanding.get() + 1);
        let request_time = now_secs();
        let mut resp = ResponseHead::default();
        let r = attempt(
            group,
            ep,
            &mut ubuf,
            &mut InMemory(Bytes::new()),
            &opts,
            &mut resp,
        )
        .await;
        let stored = match r {
            Err(_) => false,
            Ok(mut up) => {
                drop_forged_members(p, &mut resp);
                let now = now_secs();
                let fields = copy_fields(&resp);
                if resp.status == 304 && !preconditioned(&self.head) {
                    // Sent without validators (the stale copy has none): a 304 answers no
                    // question asked (RFC 9110 §15.4.5) and freshens nothing; the connection
                    // is dropped. Before, one without validators of its own was taken as
                    // selecting the copy (§4.3.4), and freshened it.
                    false
                } else if resp.status == 304 && !selected_by_304(&fields, &self.obj) {
                    // It selects nothing (§4.3.4): the stale copy goes; the next request
                    // fetches the response whole.
                    invalidate(&self.cache, &self.obj);
                    false
                } else if resp.status == 304
                    && self.cache.purged_since(self.purges, &self.obj).is_some()
                {
                    // Purged or invalidated since it was sent (RFC 9111 §4.4): not
                    // freshened back into the store.
                    false
                } else if resp.status == 304 {
                    let (key, o, auth) = (&self.key, &self.obj, self.authorized);
                    let fresh =
                        freshen_selected(p, &self.cache, key, o, &fields, auth, request_time, now);
                    if fresh.is_some() {
                        self.cache.count(|s| s.revalidations += 1);
                    }
                    fresh.is_some()
                } else {
                    match analyze(p, resp.status, fields, self.authorized, request_time, now)
                        .and_then(|s| {
                            if s.public || self.private_ok {
                                Ok(s)
                            } else {
                                Err("no-consumer")
                            }
                        }) {
                        Ok(s) => {
                            let body = read_body(&mut up, &resp, p.max_object, &self.t).await;
                            match body {
                                Some((body, reusable)) => {
                                    let reason = reason_of(&resp);
                                    let status = resp.status;
                                    resp.raw = Bytes::new();
                                    let sent = Sent::new(
                                        &self.head,
                                        &self.identity,
                                        self.client_cert.as_ref().map(|(n, v)| (&n[..], &v[..])),
                                        super::Hop {
                                            route,
                                            peer_ip: &self.peer,
                                            request_id: &self.request_id,
                                            via: &self.snap.via,
                                            port: self.port,
                                            trusted: self.trusted,
                                            https: self.https,
                                            trace: &self.trace,
                                            upstreams: &self.snap.upstreams,
                                        },
                                    );
                                    let vary = vary_values(&s.vary, &sent);
                                    let obj = make_object(
                                        s,
                                        status,
                                        reason,
                                        body,
                                        self.obj.url.clone(),
                                        vary,
                                    );
                                    // Stored under the key the stale one had, unless purged
                                    // since it was sent (RFC 9111 §4.4; stale if softly).
                                    let obj = Rc::new(obj);
                                    let purged = self.cache.purged_since(self.purges, &obj);
                                    if purged.is_some() {
                                        obj.invalid.set(true);
                                    }
                                    if purged != Some(false) {
                                        self.cache.insert(
                                            &self.key,
                                            obj.clone(),
                                            self.max_variants,
                                        );
                                        self.cache.share(&self.key, &obj, self.max_variants);
                                    }
                                    if reusable && resp.keep_alive {
                                        group.checkin(up);
                                    }
                                    purged != Some(false)
                                }
                                None => false,
                            }
                        }
                        Err(_) => false,
                    }
                }
            }
        };
        stats
            .outstanding
            .set(stats.outstanding.get().saturating_sub(1));
        stored
    }
}

/// Reads a whole response body into memory (background fetches), at most `max` bytes.
/// `Some((body, reusable))`; `None` when it failed or was too large.
async fn read_body(
    up: &mut UpConn,
    resp: &ResponseHead,
    max: u64,
    t: &Timeouts,
) -> Option<(Bytes, bool)> {
    let started = Instant::now();
    let total = t.upstream_body_total.unwrap_or(Duration::from_secs(60));
    let left = |s: Instant| total.saturating_sub(s.elapsed()).min(t.upstream_body);
    match resp.body {
        RespBody::None => Some((Bytes::new(), up.rbuf.is_empty())),
        RespBody::Length(n) => {
            if n > max {
                return None;
            }
            let n = n as usize;
            while up.rbuf.len() < n {
                let want = (n - up.rbuf.len()).min(UPSTREAM_READ_BUF);
                read_some(&mut up.stream, &mut up.rbuf, want, left(started))
                    .await
                    .ok()?;
            }
            let body = Bytes::copy_from_slice(&up.rbuf[..n]);
            let _ = up.rbuf.split_to(n);
            Some((body, up.rbuf.is_empty()))
        }
        RespBody::Chunked => {
            let mut scanner = ChunkedScanner::new();
            let mut body = BytesMut::new();
            loop {
                if !up.rbuf.is_empty() {
                    let rb = &up.rbuf;
                    let mut over = false;
                    let r = scanner
                        .scan(rb, |a, b| {
                            if (body.len() + (b - a)) as u64 > max {
                                over = true;
                            } else {
                                body.extend_from_slice(&rb[a..b]);
                            }
                        })
                        .ok()?;
                    if over {
                        return None;
                    }
                    let _ = up.rbuf.split_to(r.consumed);
                    if r.done {
                        return Some((body.freeze(), up.rbuf.is_empty()));
                    }
                }
                read_some(
                    &mut up.stream,
                    &mut up.rbuf,
                    UPSTREAM_READ_BUF,
                    left(started),
                )
                .await
                .ok()?;
            }
        }
        RespBody::Close => {
            loop {
                if up.rbuf.len() as u64 > max {
                    return None;
                }
                match read_some(
                    &mut up.stream,
                    &mut up.rbuf,
                    UPSTREAM_READ_BUF,
                    left(started),
                )
                .await
                {
                    Ok(_) => {}
                    Err(IoFail::Eof) => break,
                    Err(_) => return None,
                }
            }
            Some((Bytes::copy_from_slice(&up.rbuf), false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        analyze, analyze_response, analyze_whole, build_object, copy_fields, lifetime_of,
        make_object, policy, put_hex, reason_of, screen, screened_usual, usual_lifetime,
        usual_miss_line, vary_values, Fields, Seen, Status,
    };
    use crate::cache::config::SetCookieMode;
    use crate::cache::policy::Directives;
    use crate::cache::{QueryMode, RoutePolicy, Sent, WorkerCache};
    use crate::config::Config;
    use crate::http::request::{parse_request, Limits, RequestHead};
    use crate::http::response::{parse_response, ResponseHead};
    use bytes::{Bytes, BytesMut};
    use proptest::prelude::*;
    use std::time::Duration;

    fn policy() -> RoutePolicy {
        RoutePolicy {
            key_start: b"u\0\0\0\x01t"[..].into(),
            ignore_host: false,
            query: QueryMode::All,
            key_headers: Vec::new(),
            key_consumer: false,
            auth: false,
            set_cookie: SetCookieMode::Bypass,
            heuristic: true,
            max_heuristic: 86_400,
            swr: None,
            sie: None,
            max_object: 1 << 20,
            purge: false,
            purgers: None,
            max_variants: 8,
            coalesce_timeout: Duration::from_secs(5),
            targeted_lens: policy::length_bits(&[b"cdn-cache-control"[..].into()]),
            targeted: vec![b"cdn-cache-control"[..].into()],
            status_stored: usual_miss_line(b"ringway", false),
            status_no_store: usual_miss_line(b"ringway", true),
            name: b"ringway"[..].into(),
        }
    }

    fn status_line(s: &Status<'_>) -> String {
        let mut out = BytesMut::new();
        s.put(&mut out);
        String::from_utf8(out.to_vec()).expect("ascii")
    }

    #[test]
    fn cache_status_lines_rfc9211_2() {
        let p = policy();
        let mut s = Status::new(&p, "uri-miss");
        s.fwd_status = 200;
        s.ttl = Some(3600);
        s.stored = true;
        assert_eq!(
            status_line(&s),
            "cache-status: ringway; fwd=uri-miss; fwd-status=200; ttl=3600; stored\r\n"
        );
        s.ttl = Some(-12);
        s.stored = false;
        s.collapsed = true;
        s.detail = Some("stale-while-revalidate");
        assert_eq!(
            status_line(&s),
            "cache-status: ringway; fwd=uri-miss; fwd-status=200; ttl=-12; collapsed; \
             detail=stale-while-revalidate\r\n"
        );
        let mut h = Status::new(&p, "");
        h.hit = true;
        h.ttl = Some(i64::MIN);
        assert_eq!(
            status_line(&h),
            "cache-status: ringway; hit; ttl=-999999999999999\r\n"
        );
        // The worker keeps the last line: the same status again gives the same line, and a
        // change of any one part (or of the name alone, below) a new one.
        let again = status_line(&s);
        assert_eq!(again, status_line(&s));
        s.collapsed = false;
        assert_eq!(
            status_line(&s),
            "cache-status: ringway; fwd=uri-miss; fwd-status=200; ttl=-12; \
             detail=stale-while-revalidate\r\n"
        );
        s.fwd_status = 304;
        assert!(status_line(&s).contains("fwd-status=304; ttl=-12;"));
        s.detail = None;
        assert!(status_line(&s).ends_with("ttl=-12\r\n"));
        // Every part at its longest, with names short and long.
        for len in [1, 90, 5000] {
            let mut p = policy();
            p.name = vec![b'n'; len].into();
            let mut s = Status::new(&p, "request");
            s.fwd_status = 504;
            s.ttl = Some(i64::MAX);
            s.stored = true;
            s.collapsed = true;
            s.detail = Some("stale-while-revalidate");
            let want = format!(
                "cache-status: {}; fwd=request; fwd-status=504; ttl=999999999999999; stored; \
                 collapsed; detail=stale-while-revalidate\r\n",
                "n".repeat(len)
            );
            assert_eq!(status_line(&s), want, "name of {len} bytes");
        }
    }

    /// A fetch's line is `put`'s, whether copied whole (the usual miss, stored or refused by
    /// `no-store`) or not.
    #[test]
    fn a_fetch_s_cache_status_is_put_s_line() {
        let p = policy();
        let fetched = |s: &Status<'_>, p: &RoutePolicy| {
            let mut out = BytesMut::new();
            s.put_fetched(p, &mut out);
            String::from_utf8(out.to_vec()).expect("ascii")
        };
        fn usual(p: &RoutePolicy, stored: bool) -> Status<'_> {
            let mut s = Status::new(p, "uri-miss");
            s.fwd_status = 200;
            s.stored = stored;
            // As `screen` refuses it (the same static word).
            s.detail = (!stored).then_some(super::NO_STORE);
            s
        }
        let (s, n) = (usual(&p, true), usual(&p, false));
        assert!(s.usual(&p).is_some() && n.usual(&p).is_some());
        assert_eq!(
            fetched(&s, &p),
            "cache-status: ringway; fwd=uri-miss; fwd-status=200; stored\r\n"
        );
        assert_eq!(
            fetched(&n, &p),
            "cache-status: ringway; fwd=uri-miss; fwd-status=200; detail=no-store\r\n"
        );
        // The same words from elsewhere (not the same statics) are the same lines.
        let mut m = usual(&p, false);
        let word = String::from("no-store");
        m.detail = Some(Box::leak(word.into_boxed_str()));
        assert!(m.usual(&p).is_some());
        assert_eq!(fetched(&m, &p), fetched(&n, &p));
        // Each part changed alone: the line `put` writes (not a usual one).
        let changes: [fn(&mut Status<'_>); 9] = [
            |s| s.stored = !s.stored,
            |s| s.fwd_status = 203,
            |s| s.hit = true,
            |s| s.collapsed = true,
            |s| s.ttl = Some(0),
            |s| s.detail = Some("too-large"),
            |s| s.detail = None,
            |s| s.fwd = "vary-miss",
            |s| s.fwd = "stale",
        ];
        for stored in [true, false] {
            for (i, change) in changes.iter().enumerate() {
                let mut t = usual(&p, stored);
                change(&mut t);
                if stored && i == 6 {
                    // (Already without a detail.)
                    continue;
                }
                assert!(t.usual(&p).is_none(), "change {i}, stored {stored}");
                assert_eq!(fetched(&t, &p), status_line(&t), "change {i}");
                assert_ne!(fetched(&t, &p), fetched(&s, &p), "change {i}");
                assert_ne!(fetched(&t, &p), fetched(&n, &p), "change {i}");
            }
        }
        // Another policy's name (the lines are kept for another name) is not copied.
        let mut q = policy();
        q.name = b"edge"[..].into();
        let t = usual(&q, true);
        assert!(t.usual(&p).is_none());
        assert_eq!(
            fetched(&t, &p),
            "cache-status: edge; fwd=uri-miss; fwd-status=200; stored\r\n"
        );
        // The compiled policy's lines, for a configured name.
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[cache]\nname = \"edge-1\"\n\
                   [upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\n\
                   upstream = \"u\"\ncache = { enabled = true }\n";
        let cfg = Config::parse(src, "t.toml").expect("config");
        let c = RoutePolicy::compile(&cfg, &cfg.routes[0], "t").expect("a cache route");
        for (stored, want) in [
            (
                true,
                "cache-status: edge-1; fwd=uri-miss; fwd-status=200; stored\r\n",
            ),
            (
                false,
                "cache-status: edge-1; fwd=uri-miss; fwd-status=200; detail=no-store\r\n",
            ),
        ] {
            let t = usual(&c, stored);
            assert!(t.usual(&c).is_some());
            assert_eq!(fetched(&t, &c), want);
            assert_eq!(fetched(&t, &c), status_line(&t));
        }
        assert_eq!(c.targeted_lens, policy::length_bits(&c.targeted));
    }

    fn fields(list: &[(&'static str, &'static str)]) -> Fields {
        Fields::from_pairs(list.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))).expect("fits")
    }

    fn dates(f: &Fields) -> Vec<&[u8]> {
        crate::cache::policy::fields(f, b"date").collect()
    }

    /// What is stored of a response's fields (RFC 9111 §3.1) and the Date it is given (RFC
    /// 9110 §6.6.1): the origin's Date is kept, one is added when there is none, or when the
    /// response's `private="date"` dropped it; hop-by-hop fields go, an upstream's
    /// Cache-Status stays (RFC 9211 §2).
    #[test]
    fn stored_fields_and_date_rfc9111_3_1() {
        let p = policy();
        let t = 1_700_000_000;
        let ours = crate::date::http_date(t);
        let origin = "Tue, 14 Nov 2023 22:13:10 GMT";
        let s = analyze(
            &p,
            200,
            fields(&[
                ("Date", origin),
                ("Cache-Control", "max-age=60"),
                ("Keep-Alive", "timeout=5"),
                ("Cache-Status", "upstream; hit"),
                ("Content-Type", "text/plain"),
            ]),
            false,
            t,
            t,
        )
        .unwrap();
        let names: Vec<&[u8]> = s.fields.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                &b"Date"[..],
                b"Cache-Control",
                b"Cache-Status",
                b"Content-Type"
            ]
        );
        assert_eq!(dates(&s.fields), [origin.as_bytes()]);
        assert_eq!(s.t.lifetime, 60);

        let s = analyze(
            &p,
            200,
            fields(&[("Cache-Control", "max-age=60")]),
            false,
            t,
            t,
        )
        .unwrap();
        assert_eq!(dates(&s.fields), [&ours[..]]);

        let s = analyze(
            &p,
            200,
            fields(&[
                ("Date", origin),
                ("Cache-Control", "max-age=60, private=\"date\""),
            ]),
            false,
            t,
            t,
        )
        .unwrap();
        assert_eq!(dates(&s.fields), [&ours[..]]);

        for (f, why) in [
            (
                &[("Set-Cookie", "a=1"), ("Cache-Control", "max-age=60")][..],
                "set-cookie",
            ),
            (
                &[("Set-Cookie2", "a=1"), ("Cache-Control", "max-age=60")][..],
                "set-cookie",
            ),
            (
                &[("Vary", "accept, *"), ("Cache-Control", "max-age=60")][..],
                "vary-star",
            ),
            (&[("Cache-Control", "max-age=0")][..], "stale-on-arrival"),
        ] {
            assert_eq!(analyze(&p, 200, fields(f), false, t, t).err(), Some(why));
        }
        let s = analyze(
            &p,
            200,
            fields(&[
                ("Vary", "Accept"),
                ("ETag", "\"a\""),
                ("Cache-Control", "max-age=0"),
            ]),
            false,
            t,
            t,
        )
        .unwrap();
        assert_eq!(s.vary, [Box::from(&b"accept"[..])]);
    }

    /// RFC 9112 §7.1: chunk sizes are hexadecimal, without leading zeros here.
    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, want) in [
            (0usize, "0"),
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (255, "ff"),
            (4096, "1000"),
            (usize::MAX, "ffffffffffffffff"),
        ] {
            let mut b = BytesMut::new();
            put_hex(&mut b, n);
            assert_eq!(&b[..], want.as_bytes(), "{n}");
        }
    }

    /// A response head as an upstream sends it, parsed as `fetch` parses it; `None` when
    /// the parser refuses it.
    fn response(status: u16, lines: &[(Vec<u8>, Vec<u8>)]) -> Option<ResponseHead> {
        let mut b = format!("HTTP/1.1 {status} X\r\n").into_bytes();
        for (n, v) in lines {
            b.extend_from_slice(n);
            b.extend_from_slice(b": ");
            b.extend_from_slice(v);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"\r\n");
        let mut r = ResponseHead::default();
        let len = parse_response(&b, false, &mut r).ok()??;
        r.raw = Bytes::copy_from_slice(&b[..len]);
        Some(r)
    }

    fn request() -> RequestHead {
        let raw = b"GET /p?q HTTP/1.1\r\nHost: h\r\n\r\n";
        let mut head = RequestHead::default();
        parse_request(raw, &Limits::default(), &mut head)
            .expect("valid head")
            .expect("complete head");
        head.raw = Bytes::from_static(raw);
        head
    }

    fn worker_cache() -> std::rc::Rc<WorkerCache> {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n";
        WorkerCache::new(&Config::parse(src, "t.toml").expect("config"), 0)
    }

    /// `analyze_response` (one classifying pass over the upstream's head, copying only what
    /// is stored) decides what `analyze` decides of all the head's fields: the same fields
    /// stored in the same order, the same timing, publicity, Vary names and tags, or the same
    /// reason not to store.
    /// `whole`: analysed with a body of `body_room` bytes ([`analyze_whole`]), else with room
    /// for one ([`analyze_response`]).
    fn same_as_analyze(
        p: &RoutePolicy,
        r: &ResponseHead,
        authorized: bool,
        body_room: usize,
        whole: bool,
    ) {
        let (t0, t) = (1_700_000_000, 1_700_000_003);
        let list = |f: &Fields| -> Vec<(Vec<u8>, Vec<u8>)> {
            f.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
        };
        let want = analyze(p, r.status, copy_fields(r), authorized, t0, t);
        let cache = worker_cache();
        let req = request();
        let head = String::from_utf8_lossy(&r.raw);
        if whole {
            // Analysed with its body into the object that stores it: `make_object` of what
            // `analyze` keeps, with the body and URL.
            let body: Vec<u8> = (0..body_room).map(|i| b'a' + (i % 26) as u8).collect();
            let got = analyze_whole(p, r, &Sent::plain(&req), &cache, &body, authorized, t0, t);
            match (want, got) {
                (Ok(w), Ok((g, public))) => {
                    assert_eq!(w.public, public, "{head}");
                    let vary = vary_values(&w.vary, &Sent::plain(&req));
                    let url = Bytes::from_static(b"h/p?q");
                    let made = make_object(w, r.status, reason_of(r), body.into(), url, vary);
                    assert_eq!(format!("{made:?}"), format!("{g:?}"), "{head}");
                }
                (w, g) => assert_eq!(w.err(), g.err(), "{head}"),
            }
            return;
        }
        let got = analyze_response(p, r, &req, &cache, body_room, authorized, t0, t);
        match (want, got) {
            (Ok(w), Ok(g)) => {
                assert_eq!(list(&w.fields), list(&g.fields), "{head}");
                assert_eq!(format!("{:?}", w.t), format!("{:?}", g.t), "{head}");
                assert_eq!(w.public, g.public, "{head}");
                assert_eq!(w.vary, g.vary, "{head}");
                assert_eq!(w.tagged, g.tagged, "{head}");
                assert_eq!(&g.url[..], b"h/p?q", "{head}");
                assert!(
                    g.body.is_empty() && g.body.capacity() >= body_room,
                    "{head}"
                );
            }
            (w, g) => assert_eq!(w.err(), g.err(), "{head}"),
        }
    }

    /// The reason phrase stored is the one received; the usual one for the status is the
    /// static phrase, not a copy of the head's bytes.
    #[test]
    fn reason_of_keeps_the_phrase_received() {
        for (raw, want, usual) in [
            ("HTTP/1.1 200 OK\r\n\r\n", "OK", true),
            ("HTTP/1.1 200 Fine\r\n\r\n", "Fine", false),
            ("HTTP/1.1 200 O\r\n\r\n", "O", false),
            ("HTTP/1.1 200 OKAY\r\n\r\n", "OKAY", false),
            ("HTTP/1.1 200 ok\r\n\r\n", "ok", false),
            ("HTTP/1.1 404 Not Found\r\n\r\n", "Not Found", true),
            ("HTTP/1.1 404 Not found\r\n\r\n", "Not found", false),
        ] {
            let mut r = ResponseHead::default();
            let len = parse_response(raw.as_bytes(), false, &mut r);
            let len = len.ok().flatten().expect("a valid head");
            r.raw = Bytes::copy_from_slice(&raw.as_bytes()[..len]);
            let got = reason_of(&r);
            assert_eq!(&got[..], want.as_bytes(), "{raw:?}");
            let usual_phrase = super::reason_phrase(r.status).as_bytes();
            assert_eq!(got.as_ptr() == usual_phrase.as_ptr(), usual, "{raw:?}");
        }
    }

    /// A fetched response's object built in place (`build_object`, in an evicted object's
    /// allocation or a new one) is the object `make_object` makes of the same parts, tags and
    /// Vary values included; the evicted object's own parts do not show through.
    #[test]
    fn an_object_built_in_place_is_the_one_make_object_makes() {
        let l = |v: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            v.iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        let p = policy();
        let req = request();
        let (t0, t) = (1_700_000_000, 1_700_000_003);
        let cases = [
            l(&[("Cache-Control", "max-age=60"), ("Content-Length", "5")]),
            l(&[
                ("Cache-Control", "max-age=60"),
                ("Surrogate-Key", "k1 k2"),
                ("Vary", "Host, Accept"),
                ("ETag", "\"a\""),
            ]),
        ];
        // A budget of a few objects: most stores evict one, which the next is built over.
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache]\nmax_bytes_per_worker = \"2KiB\"\nmax_object_bytes = \"1KiB\"\n";
        let cache = WorkerCache::new(&Config::parse(src, "t.toml").expect("config"), 0);
        let mut reused = 0;
        for (i, c) in cases.iter().cycle().take(12).enumerate() {
            let r = response(200, c).expect("valid head");
            let analysed = || {
                let s = analyze_response(&p, &r, &req, &cache, 5, false, t0, t);
                s.expect("stored")
            };
            let mut a = analysed();
            let url = std::mem::take(&mut a.url);
            let vary = vary_values(&a.vary, &Sent::plain(&req));
            let made = make_object(
                a,
                r.status,
                reason_of(&r),
                Bytes::from_static(b"body!"),
                url,
                vary,
            );
            let kept = cache
                .spare_object
                .borrow()
                .as_ref()
                .map(std::rc::Rc::as_ptr);
            // Two cases out of four as `fetch` stores a body read whole (analysed with it), the
            // others as it stores one captured on the way (in the room left for it).
            let built = if i / 2 % 2 == 0 {
                let w = analyze_whole(&p, &r, &Sent::plain(&req), &cache, b"body!", false, t0, t);
                w.expect("stored").0
            } else {
                let mut b = analysed();
                let vary = vary_values(&b.vary, &Sent::plain(&req));
                let mut body = std::mem::take(&mut b.body);
                body.extend_from_slice(b"body!");
                let body = body.freeze();
                build_object(&cache, &mut b, r.status, reason_of(&r), body, vary)
            };
            assert_eq!(format!("{made:?}"), format!("{built:?}"), "case {i}");
            assert_eq!(built.weight(), made.weight(), "case {i}");
            assert_eq!(built.tags.is_empty(), i % 2 == 0, "case {i}: tags");
            assert_eq!(built.vary.len(), if i % 2 == 0 { 0 } else { 2 }, "case {i}");
            if let Some(kept) = kept {
                assert_eq!(std::rc::Rc::as_ptr(&built), kept, "case {i}: built over");
                reused += 1;
            }
            // Stored, evicting one when the budget is full.
            cache.insert(format!("k{i}").as_bytes(), built, 4);
        }
        assert!(reused >= 6, "{reused} built over an evicted object");
    }

    /// The stored miss's one-test screen passes only responses that `screen`'s rules pass
    /// (§3, §3.5), and passes the usual one.
    #[test]
    fn screened_usual_passes_only_what_screen_passes() {
        for status in [
            100, 199, 200, 203, 204, 206, 301, 304, 400, 404, 408, 412, 413, 416, 417, 429, 431,
            500, 599, 600, 999,
        ] {
            for bits in 0u8..64 {
                let mut d = Directives::default();
                d.must_understand = bits & 1 != 0;
                d.no_store = bits & 2 != 0;
                d.private = bits & 4 != 0;
                d.public = bits & 16 != 0;
                d.must_revalidate = bits & 32 != 0;
                let authorized = bits & 8 != 0;
                if screened_usual(status, &d, authorized) {
                    assert_eq!(screen(status, &d, authorized), Ok(()), "{status} {bits}");
                }
            }
        }
        assert!(screened_usual(200, &Directives::default(), false));
        assert!(screened_usual(404, &Directives::default(), false));
    }

    /// The usual response's lifetime, found in line, is the one the general rules find for it
    /// (§4.2.1, §4.2.3: no Age); a response with Age, Vary, Set-Cookie or no explicit lifetime
    /// is left to those rules.
    #[test]
    fn usual_lifetime_is_the_general_rules_lifetime_rfc9111_4_2_1() {
        let p = policy();
        let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
        type Lines<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Lines<'_>, Option<u64>); 9] = [
            (&[("cache-control", "max-age=60")], Some(60)),
            (
                &[date, ("Cache-Control", "s-maxage=5, max-age=60")],
                Some(5),
            ),
            (
                &[("cache-control", "max-age=60"), ("expires", "0")],
                Some(60),
            ),
            (
                &[("cache-control", "max-age=0"), ("etag", "\"a\"")],
                Some(0),
            ),
            (&[("cache-control", "max-age=60"), ("age", "10")], None),
            (&[("cache-control", "max-age=60"), ("vary", "accept")], None),
            (
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                None,
            ),
            (&[date, ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")], None),
            (&[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")], None),
        ];
        for (lines, want) in cases {
            let fields =
                Fields::from_pairs(lines.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
                    .expect("small");
            let seen = Seen::of(fields.view());
            let (d, targeted) = p.response_directives(fields.view());
            let usual = usual_lifetime(&d, &seen);
            assert_eq!(usual, want, "{lines:?}");
            if let Some(lifetime) = usual {
                let general = lifetime_of(&p, 200, fields.view(), &seen, &d, targeted, 1_000);
                assert_eq!(general, Ok((lifetime, 0, Vec::new())), "{lines:?}");
            }
        }
    }

    #[test]
    fn analyze_response_decides_as_analyze_does() {
        let l = |v: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            v.iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        let date = "Tue, 14 Nov 2023 22:13:10 GMT";
        let cases = [
            // What the perf origin (nginx) sends.
            l(&[
                ("Server", "nginx"),
                ("Date", date),
                ("Content-Type", "text/plain"),
                ("Content-Length", "1024"),
                ("Connection", "keep-alive"),
                ("Cache-Control", "max-age=3600"),
            ]),
            l(&[("cache-control", "max-age=60"), ("etag", "\"a\"")]),
            l(&[
                ("cache-control", "max-age=60"),
                ("AGE", "5"),
                ("server", "s"),
            ]),
            l(&[("cache-control", "max-age=60"), ("cache-status", "up; hit")]),
            l(&[
                ("cache-control", "max-age=60, private=\"x-a\""),
                ("x-a", "1"),
                ("x-b", "2"),
            ]),
            l(&[
                ("cache-control", "max-age=60"),
                ("Surrogate-Key", "k1 k2"),
                ("set-cookie", "a=b"),
            ]),
            // Connection-listed lines count for nothing, Cache-Control among them.
            l(&[
                ("Connection", "x-a, cache-control"),
                ("Cache-Control", "no-store"),
                ("x-a", "1"),
                ("Cache-Control", "max-age=5"),
                ("Date", date),
            ]),
            // A targeted field governs (RFC 9213), Expires is then ignored; an invalid one
            // is ignored as a whole.
            l(&[
                ("CDN-Cache-Control", "max-age=30"),
                ("Cache-Control", "no-store"),
                ("Expires", date),
            ]),
            l(&[
                ("CDN-Cache-Control", "max-age=\"30\""),
                ("Cache-Control", "max-age=3, no-cache=\"date\""),
                ("Date", date),
            ]),
            l(&[("Cache-Control", "max-age =60"), ("Last-Modified", date)]),
            l(&[
                ("Vary", "Accept"),
                ("vary", "*"),
                ("Cache-Control", "max-age=1"),
            ]),
            l(&[
                ("Transfer-Encoding", "chunked"),
                ("Keep-Alive", "timeout=5"),
                ("X-Request-Id", "r"),
                ("Proxy-Authenticate", "Basic"),
                ("Cache-Control", "public"),
            ]),
        ];
        let mut p = policy();
        for mode in [
            SetCookieMode::Bypass,
            SetCookieMode::Strip,
            SetCookieMode::Store,
        ] {
            p.set_cookie = mode;
            for c in &cases {
                for authorized in [false, true] {
                    let r = response(200, c).expect("valid head");
                    same_as_analyze(&p, &r, authorized, 100, false);
                    same_as_analyze(&p, &r, authorized, 100, true);
                }
            }
        }
        let r = response(200, &cases[0]).expect("valid head");
        let s =
            analyze_response(&p, &r, &request(), &worker_cache(), 0, false, 0, 0).expect("stored");
        let names: Vec<&[u8]> = s.fields.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [&b"Server"[..], b"Date", b"Content-Type", b"Cache-Control"]
        );
    }

    /// Field names: those the analysis reads or drops, in any case, and others.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        let known = prop::sample::select(vec![
            "cache-control",
            "cdn-cache-control",
            "x-targeted",
            "age",
            "date",
            "expires",
            "last-modified",
            "etag",
            "vary",
            "set-cookie",
            "set-cookie2",
            "cache-status",
            "surrogate-key",
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
            "x-request-id",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "proxy-authentication-info",
            "x-a",
            "x-b",
            "server",
            "content-type",
            "cache-controls",
            "dat",
        ]);
        prop_oneof![
            4 => (known, any::<u64>()).prop_map(|(n, mask)| {
                n.bytes()
                    .enumerate()
                    .map(|(i, b)| if mask >> (i % 64) & 1 == 1 { b.to_ascii_uppercase() } else { b })
                    .collect()
            }),
            1 => "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,26}".prop_map(String::into_bytes),
        ]
    }

    /// Values: directive lists (valid, odd and targeted), dates, ages, Vary and Connection
    /// lists, and anything printable.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        let known = prop::sample::select(vec![
            "max-age=60",
            "max-age=0",
            "max-age =60",
            "s-maxage=5, max-age=1",
            "no-store",
            "no-store, must-understand",
            "must-understand, max-age=9",
            "private",
            "private=\"x-a, date\"",
            "no-cache=\"x-b\", max-age=5",
            "no-cache",
            "public",
            "must-revalidate",
            "stale-while-revalidate=30",
            "stale-if-error=5",
            "max-age=\"7\", x=\"a, b\"",
            "max-age=?0, public",
            "max-age=30, no-store=?1",
            "Tue, 14 Nov 2023 22:13:10 GMT",
            "Tue, 14 Nov 2023 22:13:13 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "0",
            "5",
            "7, 3",
            "x",
            "accept",
            "Accept-Encoding, accept",
            "*",
            "x-a",
            "close, x-b",
            "cache-control",
            "Date, cdn-cache-control",
            "k1 k2",
            "\"e\"",
            "",
        ]);
        prop_oneof![
            4 => known.prop_map(|v| v.as_bytes().to_vec()),
            1 => "[ -~]{0,24}".prop_map(|v| v.trim().as_bytes().to_vec()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn analyze_response_decides_as_analyze_does_for_any_head(
            lines in prop::collection::vec((name(), value()), 0..12),
            status in prop::sample::select(vec![200u16, 203, 204, 206, 299, 304, 404, 410, 500, 599]),
            mode in prop::sample::select(vec![SetCookieMode::Bypass, SetCookieMode::Strip, SetCookieMode::Store]),
            targeted in prop::sample::select(vec![0usize, 1, 2, 3]),
            heuristic in any::<bool>(),
            authorized in any::<bool>(),
            body_room in 0usize..64,
            whole in any::<bool>(),
        ) {
            let mut p = policy();
            p.set_cookie = mode;
            p.heuristic = heuristic;
            p.targeted = match targeted {
                0 => Vec::new(),
                1 => vec![b"cdn-cache-control"[..].into()],
                2 => vec![b"x-targeted"[..].into(), b"cdn-cache-control"[..].into()],
                _ => vec![b"cache-control"[..].into()],
            };
            p.targeted_lens = policy::length_bits(&p.targeted);
            // Heads the parser refuses (a framing field's value) never reach the cache.
            if let Some(r) = response(status, &lines) {
                same_as_analyze(&p, &r, authorized, body_room, whole);
            }
        }
    }
}
