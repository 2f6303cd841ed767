//! A request's phases, in the order they run:
//!
//! ```text
//!  head ─► route ─► client cert ─► auth ─► rate limits ─► concurrency ─► body limit ─► action
//!                                                                                   │
//!               direct response ◄──────────────────────────────────────────────────┤
//!               [cache]  [compose]                                                  │
//!               upstream (forward.rs: endpoint, attempts, retries) ─► relay ◄───────┘
//! ```
//!
//! Each phase is a function of the request context. A phase that refuses the request returns
//! the error; the connection's `finish` turns it into the answer and decides what happens to
//! the connection. No phase writes to the client itself, except the relay of a proxied
//! response.

use std::time::{Duration, Instant};

use bytes::BufMut;

use crate::auth::Denied;
use crate::config::{RateKey, RedisFailure};
use crate::error::GatewayError;
use crate::http::encode::put_u64;
use crate::http::request::{BodyKind, ParseError};
use crate::ratelimit::Verdict;
use crate::rewrite::{max_forwards, max_forwards_applies};
use crate::router::{host_without_port, Action, Route};
use crate::upstream::balance::hash_bytes;

use super::conn::{Answer, ClientIo, Conn, Outcome};
use super::ctx::RequestCtx;
use super::forward;
use super::worker::{Snapshot, Worker};

/// Runs the phases of one request whose head has been read.
pub async fn run<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
) -> Outcome<'c> {
    match run_phases(w, cfg, c, ctx).await {
        Ok(out) => out,
        Err(e) => Outcome::from(e),
    }
}

async fn run_phases<'c, S: ClientIo>(
    w: &Worker,
    cfg: &'c Snapshot,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
) -> Result<Outcome<'c>, GatewayError> {
    if let Some(port) = cfg.listeners[c.info.listener].redirect_https {
        return redirect_https(ctx, port);
    }
    let route = route(cfg, ctx)?;
    client_cert(route, c)?;
    ctx.t = cfg.timeouts.for_route(&route.timeouts);
    authenticate(w, route, ctx).await?;
    rate_limit(w, cfg, route, c, ctx).await?;
    // Held until the response is done.
    let _slot = concurrency(w, cfg, route, c, ctx)?;
    body_limit(cfg, route, ctx)?;
    if last_hop(ctx) {
        return Ok(Outcome::Answer(Answer::LastHop));
    }
    match &route.action {
        Action::Direct(d) => Ok(Outcome::Answer(Answer::Direct(d))),
        Action::Proxy { upstream } => match route.cache.as_deref() {
            None => Ok(forward::proxy(w, cfg, route, &cfg.upstreams[*upstream], c, ctx).await),
            Some(p) => Ok(crate::cache::serve::run(w, cfg, route, p, *upstream, c, ctx).await),
        },
        // Boxed: the composition's state stays off the request future of other routes.
        Action::Compose(plan) => {
            let out = Box::pin(crate::compose::run(w, cfg, route, plan, ctx)).await;
            Ok(Outcome::Answer(Answer::Composed(Box::new(out))))
        }
    }
}

/// A `redirect_https` listener answers every request with a 308 to https; a request without a
/// usable Host gets a 400.
fn redirect_https<'c>(
    ctx: &RequestCtx<'_>,
    port: Option<u16>,
) -> Result<Outcome<'c>, GatewayError> {
    let host = ctx
        .head
        .host_bytes()
        .map(host_without_port)
        .filter(|h| valid_host(h))
        .ok_or(GatewayError::Parse(ParseError::Bad(
            "a redirect to https needs a valid Host",
        )))?;
    Ok(Outcome::Answer(Answer::Redirect {
        host_len: host.len(),
        port,
    }))
}

fn route<'c>(cfg: &'c Snapshot, ctx: &mut RequestCtx<'_>) -> Result<&'c Route, GatewayError> {
    let i = cfg
        .router
        .find_index(&ctx.head)
        .ok_or(GatewayError::NoRoute)?;
    ctx.route = Some(i);
    let route = &cfg.router.routes[i];
    // A clean path that the route's rewrite would turn into a traversing upstream target.
    if route.rewrite_makes_dot_segment(ctx.head.path_bytes()) {
        return Err(GatewayError::Parse(ParseError::Bad(
            "the route's rewrite would make a dot segment of this path",
        )));
    }
    Ok(route)
}

fn client_cert<S>(route: &Route, c: &Conn<S>) -> Result<(), GatewayError> {
    if route.require_client_cert && c.info.client_subject.is_none() {
        return Err(GatewayError::ClientCertRequired);
    }
    Ok(())
}

/// Auth comes before rate limits, so that limits can count per consumer or claim.
async fn authenticate(
    w: &Worker,
    route: &Route,
    ctx: &mut RequestCtx<'_>,
) -> Result<(), GatewayError> {
    let Some(policy) = &route.auth else {
        return Ok(());
    };
    let now = w.now_secs();
    let auth = ctx.auth.clone();
    match auth.check(policy, &ctx.head, now, &mut ctx.identity).await {
        Ok(()) => {
            auth.put_upstream_headers(&ctx.identity, &mut ctx.auth_headers);
            Ok(())
        }
        Err(d) => {
            if let Denied::Unauthorized(f) = d {
                // The client's answer says only `invalid_token` (see `AuthFail::message`).
                crate::debug!("auth: route {}: 401: {}", route.name, f.reason());
            }
            ctx.resp_headers.put_slice(policy.challenge(d));
            Err(match d {
                Denied::Unauthorized(f) => GatewayError::Unauthorized(f),
                Denied::Forbidden => GatewayError::Forbidden,
                Denied::Unavailable => GatewayError::AuthUnavailable,
            })
        }
    }
}

/// The key a limit counts this request under.
fn limit_key<S>(cfg: &Snapshot, key: &RateKey, c: &Conn<S>, ctx: &RequestCtx<'_>) -> u64 {
    // The client's address: the peer, or behind a trusted proxy the one its forwarding
    // header names.
    let address = || {
        let peer = c.peer.as_bytes();
        if c.info.trusted {
            client_behind_proxies(cfg, ctx, peer)
        } else {
            hash_bytes(peer)
        }
    };
    match key {
        RateKey::ClientIp => address(),
        RateKey::Route => 0,
        // Requests without the header share one bucket.
        RateKey::Header(h) => hash_bytes(ctx.head.header(h.as_bytes()).unwrap_or(b"")),
        // Callers the auth stage could not name are counted by address. The domain tags keep
        // a consumer or claim value from sharing a bucket with an address.
        RateKey::Consumer => match ctx.identity.consumer_name() {
            Some(name) => tagged_hash(name.as_bytes(), 0xc0),
            None => address(),
        },
        RateKey::Claim(cl) => match ctx.identity.claim(cl) {
            Some(serde_json::Value::String(s)) => tagged_hash(s.as_bytes(), 0xc1),
            // A null claim is no claim (as for required claims): counted by address.
            None | Some(serde_json::Value::Null) => address(),
            Some(v) => tagged_hash(v.to_string().as_bytes(), 0xc1),
        },
    }
}

/// The client address of a request that came through trusted proxies, hashed as a peer
/// address is: walking `X-Forwarded-For` (all its lines, in order) from the right, the first
/// element that is not a trusted proxy (each proxy appends the address it saw, so a client
/// cannot push its own element past them); an element that is not an address is the client
/// as written; every element trusted: the leftmost. No header: the peer itself.
#[cold]
#[inline(never)]
fn client_behind_proxies(cfg: &Snapshot, ctx: &RequestCtx<'_>, peer: &[u8]) -> u64 {
    let mut client: Option<&[u8]> = None;
    // Lines in order, elements in order: the last one not trusted wins.
    for line in ctx.head.header_values(b"x-forwarded-for") {
        for e in line.split(|b| *b == b',') {
            let e = crate::http::trim_ows(e);
            if e.is_empty() {
                continue;
            }
            match forwarded_ip(e) {
                Some(ip) if cfg.trusted_proxies.contains(ip) => {
                    client.get_or_insert(e);
                }
                _ => client = Some(e),
            }
        }
    }
    let Some(e) = client else {
        return hash_bytes(peer);
    };
    // The address in its usual text (as the peer's is written), so that one client is
    // counted alike however a proxy spelled it (port, brackets, case).
    match forwarded_ip(e) {
        Some(ip) => {
            use std::io::Write;
            let mut buf = [0u8; 64];
            let mut out = &mut buf[..];
            let _ = write!(out, "{ip}");
            let n = 64 - out.len();
            hash_bytes(&buf[..n])
        }
        None => hash_bytes(e),
    }
}

/// An `X-Forwarded-For` element as an address: `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:8080`.
pub(crate) fn forwarded_ip(e: &[u8]) -> Option<std::net::IpAddr> {
    let s = std::str::from_utf8(e).ok()?;
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| host.parse().ok())?
}

/// A key's hash in its own domain (`tag`), apart from the address hashes.
fn tagged_hash(data: &[u8], tag: u64) -> u64 {
    crate::upstream::balance::mix(hash_bytes(data) ^ tag)
}

/// Applies the route's rate limits. Only the first request of a key kept in Redis may wait
/// here (asleep on the worker's doorbell until the Redis thread answers), and no longer than
/// the Redis timeout: then the failure policy applies, local buckets or 503.
async fn rate_limit<S>(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    c: &Conn<S>,
    ctx: &mut RequestCtx<'_>,
) -> Result<(), GatewayError> {
    if route.limits.is_empty() {
        return Ok(());
    }
    let mut started: Option<Instant> = None;
    let mut local = false;
    // Set before a second look; the wait after it sleeps until the Redis thread has answered
    // a round (crate::doorbell), so an answer between the look and the wait is not missed.
    let mut watch: Option<crate::doorbell::Watch<'_>> = None;
    loop {
        if let Some(answer) = check_rate_limits(w, cfg, route, c, ctx, local) {
            return answer;
        }
        let t0 = *started.get_or_insert_with(Instant::now);
        let Some(redis) = w.limiter.host().redis() else {
            local = true;
            continue;
        };
        let rc = redis.config();
        let deadline = t0 + rc.timeout.0.saturating_add(Duration::from_millis(5));
        if Instant::now() > deadline {
            match rc.on_failure {
                RedisFailure::Local => local = true,
                RedisFailure::Deny => return Err(GatewayError::RateLimitUnavailable),
            }
        } else if let Some(wt) = watch.take() {
            wt.wait(deadline).await;
        } else {
            w.doorbell.join(&redis.doorbells);
            watch = Some(w.doorbell.watch());
        }
    }
}

/// Applies the route's rate limits and writes the RateLimit headers for the response.
/// `Some(Ok)`: admitted; `Some(Err)`: refused; `None` when Redis was asked for a key's first
/// tokens and has not answered yet.
fn check_rate_limits<S>(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    c: &Conn<S>,
    ctx: &mut RequestCtx<'_>,
    local: bool,
) -> Option<Result<(), GatewayError>> {
    let mut keys = [0u64; crate::config::MAX_RATE_LIMITS_PER_ROUTE];
    let n = route.limits.len().min(keys.len());
    for (k, l) in keys.iter_mut().zip(&route.limits) {
        *k = limit_key(cfg, &l.key, c, ctx);
    }
    let verdict = w
        .limiter
        .check(&route.limits[..n], &keys[..n], Instant::now(), local);
    let (i, remaining, reset, refused) = match verdict {
        Verdict::Allow {
            limit,
            remaining,
            reset_secs,
        } => (limit, remaining, reset_secs, None),
        Verdict::Deny { limit, retry_after } => (limit, 0, retry_after, Some(retry_after)),
        Verdict::Wait => return None,
        Verdict::Unavailable => return Some(Err(GatewayError::RateLimitUnavailable)),
    };
    let l = &route.limits[i];
    let h = &mut ctx.resp_headers;
    h.put_slice(b"ratelimit-policy: \"");
    h.put_slice(l.name.as_bytes());
    h.put_slice(b"\";q=");
    put_u64(h, l.quota as u64);
    h.put_slice(b";w=");
    put_u64(h, l.window_secs);
    h.put_slice(b"\r\nratelimit: \"");
    h.put_slice(l.name.as_bytes());
    h.put_slice(b"\";r=");
    put_u64(h, remaining);
    h.put_slice(b";t=");
    put_u64(h, reset);
    h.put_slice(b"\r\n");
    Some(match refused {
        None => Ok(()),
        Some(s) => Err(GatewayError::RateLimited(s.min(u32::MAX as u64) as u32)),
    })
}

/// The route's concurrency limit: a slot held until the response is done.
fn concurrency<S>(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    c: &Conn<S>,
    ctx: &RequestCtx<'_>,
) -> Result<Option<crate::ratelimit::Slot>, GatewayError> {
    let Some(cc) = &route.concurrency else {
        return Ok(None);
    };
    let key = limit_key(cfg, &cc.key, c, ctx);
    match w.limiter.host().acquire(cc, key) {
        Some(slot) => Ok(Some(slot)),
        None => Err(GatewayError::ConcurrencyLimited),
    }
}

/// TRACE or OPTIONS with `Max-Forwards: 0`: this hop is the last (RFC 9110 §7.6.2).
fn last_hop(ctx: &RequestCtx<'_>) -> bool {
    max_forwards_applies(ctx.head.method)
        && ctx.head.header(b"max-forwards").and_then(max_forwards) == Some(0)
}

/// A declared body over the route's limit is refused before any of it is read; a chunked
/// body is counted as it arrives.
fn body_limit(cfg: &Snapshot, route: &Route, ctx: &mut RequestCtx<'_>) -> Result<(), GatewayError> {
    let max_body = route.max_body_bytes.unwrap_or(cfg.limits.max_body_bytes);
    ctx.body.set_route(max_body, route.trailers);
    if let BodyKind::Length(n) = ctx.head.body {
        if n > max_body {
            return Err(GatewayError::BodyTooLarge);
        }
    }
    Ok(())
}

/// A host fit for a Location URL: a name or an IPv4 address, or a bracketed IPv6 address.
fn valid_host(h: &[u8]) -> bool {
    if let Some(inner) = h.strip_prefix(b"[").and_then(|r| r.strip_suffix(b"]")) {
        return !inner.is_empty()
            && inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b".:".contains(b));
    }
    !h.is_empty()
        && h.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_hosts_lose_their_port_and_must_be_plain_names_or_addresses() {
        assert_eq!(host_without_port(b"a.test:8080"), b"a.test");
        assert_eq!(host_without_port(b"a.test"), b"a.test");
        assert_eq!(host_without_port(b"[::1]:80"), b"[::1]");
        for ok in [
            &b"a.test"[..],
            b"10.0.0.1",
            b"[::1]",
            b"[fe80::1]",
            b"under_score",
        ] {
            assert!(valid_host(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b"a/b",
            b"a@b",
            b"a b",
            b"[]",
            b"[::1",
            b"a\"b",
            b"evil.test?x",
            b"[::1]x",
        ] {
            assert!(!valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
