//! The upstream phase: the request body kept for a replay when it may be needed, an endpoint
//! per try, attempts (see `attempt.rs`) with retries, breaker and outlier bookkeeping, then
//! the response relay.

use std::time::Instant;

use bytes::BytesMut;

use crate::config::HashOn;
use crate::error::GatewayError;
use crate::http::request::Method;
use crate::http::response::ResponseHead;
use crate::retry::{Failure, RetryPolicy};
use crate::rewrite::{encode_upstream_head, Forwarding};
use crate::router::Route;
use crate::upstream::balance::hash_bytes;
use crate::upstream::breaker::{Admit, Probe};
use crate::upstream::health::Ejection;
use crate::upstream::{UpConn, UpstreamGroup};
use crate::warn;

use super::attempt::{attempt, AttemptError, AttemptOpts, DownFail, Downstream};
use super::conn::{ClientIo, Conn, Outcome};
use super::ctx::RequestCtx;
use super::relay::{forward_response, ClientSide};
use super::worker::{Snapshot, Worker};

/// Proxies the request to `group`, answering with the upstream's response or an error.
pub async fn proxy<'c, S: ClientIo>(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
) -> Outcome<'c> {
    let mut resp = w.bufs.take_resp();
    let exchanged = exchange(w, cfg, route, group, c, ctx, &mut resp).await;
    if exchanged.is_err() && ctx.rec.upstream_start.is_some() {
        // A failed upstream phase took this long (an error path: one more clock reading).
        ctx.rec.upstream_answered(Instant::now());
    }
    let out = match exchanged {
        Err(AttemptError::Down(DownFail::Gone)) => Outcome::Abort,
        Err(e) => match e.answer() {
            Some(g) => Outcome::from(g),
            None => Outcome::Abort,
        },
        Ok(Chosen {
            mut up,
            probe,
            failed,
        }) => {
            let (out, reusable) = forward_response(w, cfg, route, c, ctx, &mut up, &resp).await;
            // The response head shares the upstream read buffer: release it before the
            // connection is reused, so the buffer is reclaimed rather than reallocated.
            resp.raw = bytes::Bytes::new();
            // A body whose framing broke before it reached the client is answered 502: the
            // endpoint failed this request.
            let failed = failed || matches!(out, Outcome::Answer(_));
            settle(w, group, up, probe, failed, reusable);
            out
        }
    };
    w.bufs.give_resp(resp);
    out
}

/// The connection a response head came on, and what the breaker is owed for it.
pub(crate) struct Chosen {
    pub up: UpConn,
    /// The breaker admitted this try as one of its half-open probes.
    pub probe: Probe,
    /// The response is a failure for the endpoint's books (a 5xx).
    pub failed: bool,
}

/// Ends the bookkeeping of a response read (relayed or buffered) from `up`: the endpoint's
/// outstanding count, the breaker and outlier detection, and the pool when `reusable`.
pub(crate) fn settle(
    w: &Worker,
    group: &UpstreamGroup,
    up: UpConn,
    probe: Probe,
    failed: bool,
    reusable: bool,
) {
    let ep = up.endpoint;
    let stats = &group.stats[ep];
    // (Saturating: a count that went wrong must not wrap to a huge load.)
    stats
        .outstanding
        .set(stats.outstanding.get().saturating_sub(1));
    record_outcome(w, group, ep, probe, failed);
    if reusable {
        group.checkin(up);
    }
}

/// How [`try_endpoints`] makes its tries: the retry policy and what it may retry.
pub(crate) struct TryOpts<'a> {
    pub policy: Option<&'a RetryPolicy>,
    /// The method may be sent twice (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// The body is held for a replay (a retry may send it again).
    pub replayed: bool,
    /// The consistent-hashing key, for a group that hashes.
    pub hash: Option<u64>,
    pub head_request: bool,
    pub t: super::worker::Timeouts,
    /// Every try ends by this instant, and no retry is begun when its backoff would end past it.
    pub deadline: Option<Instant>,
}

/// Tries the request until an attempt gives a response that is not retried, or the retry
/// policy, the breaker or the endpoints say stop.
pub(crate) async fn exchange<S: ClientIo>(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    group: &UpstreamGroup,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    resp: &mut ResponseHead,
) -> Result<Chosen, AttemptError> {
    let policy = route.retry.as_ref();
    let idempotent = ctx.head.method.is_idempotent();
    let hash = group.hash_on.as_ref().map(|h| hash_key(h, c, ctx));
    let listener = &cfg.listeners[c.info.listener];
    let mut down = ClientSide::new(
        &mut c.io,
        &mut c.rbuf,
        &mut ctx.body,
        ctx.t,
        ctx.head.version,
    );
    down.denied = Some(&route.request_headers);
    down.replay = down
        .read_replayable(policy.map_or(0, |p| p.max_replay))
        .await
        .map_err(AttemptError::Down)?;
    let replayed = down.replay.is_some();
    let traceparent = ctx.rec.trace.traceparent();
    let fwd = Forwarding {
        peer_ip: c.peer.as_bytes(),
        trusted: c.info.trusted,
        port: c.info.port,
        request_id: ctx.id.as_bytes(),
        via: &cfg.via,
        https: c.info.tls,
        client_cert: listener
            .subject_header
            .as_deref()
            .zip(c.info.client_subject.as_deref()),
        identity: &ctx.auth_headers,
        traceparent: Some(&traceparent),
        keep_tracestate: ctx.rec.trace.keep_state,
    };
    let o = TryOpts {
        policy,
        idempotent,
        replayed,
        hash,
        head_request: ctx.head.method == Method::Head,
        t: ctx.t,
        deadline: None,
    };
    let head = &ctx.head;
    try_endpoints(
        w,
        group,
        &o,
        &mut down,
        &mut ctx.ubuf,
        resp,
        &mut ctx.rec,
        |out, ep| encode_upstream_head(out, head, route, &group.endpoints[ep].authority, &fwd),
    )
    .await
}

/// Tries a request on `group` until an attempt gives a response that is not retried, or the
/// retry policy, the breaker, the endpoints or the deadline say stop. `encode` writes the
/// request head for an endpoint into the buffer. Used for proxied requests (the body from the
/// client) and for composition's sub-requests (an [`super::attempt::InMemory`] body). `rec`
/// takes the upstream timing, the endpoint and the retries.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn try_endpoints<D: Downstream>(
    w: &Worker,
    group: &UpstreamGroup,
    o: &TryOpts<'_>,
    down: &mut D,
    ubuf: &mut BytesMut,
    resp: &mut ResponseHead,
    rec: &mut super::record::Record,
    mut encode: impl FnMut(&mut BytesMut, usize),
) -> Result<Chosen, AttemptError> {
    let (policy, idempotent, replayed, hash) = (o.policy, o.idempotent, o.replayed, o.hash);
    // One clock reading for the retry budget and the upstream latency.
    let t0 = (policy.is_some() || rec.start.is_some()).then(Instant::now);
    rec.upstream_began(t0, group.index);
    if let (Some(p), Some(t0)) = (policy, t0) {
        p.record_request(t0);
    }
    let mut tried = [usize::MAX; 10];
    let mut ntried = 0;
    let mut tries = 0u32;
    let mut stale_retry_used = false;
    loop {
        tries += 1;
        let probe = match group.breaker.as_ref().map(|b| b.admit(Instant::now())) {
            None => Probe::NONE,
            Some(Admit::Yes { probe }) => probe,
            Some(Admit::Open(d)) => {
                let secs = d.as_secs().clamp(1, u32::MAX as u64) as u32;
                return Err(AttemptError::Connect(GatewayError::CircuitOpen(secs)));
            }
            Some(Admit::Busy) => return Err(AttemptError::Overloaded),
        };
        let Some(ep) = group.pick(hash, &tried[..ntried]) else {
            if let Some(b) = &group.breaker {
                b.cancel(probe);
            }
            return Err(AttemptError::Connect(GatewayError::NoHealthyEndpoint));
        };
        rec.endpoint = Some(ep);
        if ntried < tried.len() {
            tried[ntried] = ep;
            ntried += 1;
        }
        let stats = &group.stats[ep];
        stats.outstanding.set(stats.outstanding.get() + 1);
        group.note_in_flight(ep, stats.outstanding.get() as usize);
        // Latency is sampled only for a balancer that uses it (clock reads add up).
        let started = group.tracks_latency().then(Instant::now);
        encode(ubuf, ep);
        let mut t = o.t;
        if let Some(d) = o.deadline {
            // Every try ends by the deadline, a retry's included.
            let left = d.saturating_duration_since(Instant::now());
            t.upstream_connect = t.upstream_connect.min(left);
            t.upstream_write = t.upstream_write.min(left);
            t.upstream_response = t.upstream_response.min(left);
        }
        let opts = AttemptOpts {
            head_request: o.head_request,
            allow_pool: !stale_retry_used,
            // Every pooled connection is peeked before reuse: not only to see that the
            // upstream did not close it (a resend would cover that for an idempotent request),
            // but that it sent nothing since its last response. Bytes an upstream sends late
            // past a complete response would otherwise be read as the next request's answer,
            // and every later request on the connection would get its predecessor's (RFC 9112
            // §9.3.2).
            verify: true,
            t,
        };
        let r = attempt(group, ep, ubuf, down, &opts, resp).await;
        let failure = match &r {
            Ok(_) => {
                if started.is_some() || rec.upstream_start.is_some() {
                    let now = Instant::now();
                    if let Some(t0) = started {
                        stats.observe_latency(now - t0, now);
                    }
                    rec.upstream_answered(now);
                }
                (resp.status >= 500).then_some(Failure::Status(resp.status))
            }
            Err(AttemptError::Stale) if !stale_retry_used && replayed && idempotent => {
                // A pooled connection the upstream had closed: once more on a new connection.
                // Not the endpoint's fault, and not a retry of the policy's.
                stats.outstanding.set(stats.outstanding.get() - 1);
                if let Some(b) = &group.breaker {
                    b.cancel(probe);
                }
                stale_retry_used = true;
                tries -= 1;
                ntried -= 1;
                continue;
            }
            Err(
                AttemptError::Stale | AttemptError::Reset | AttemptError::Tls | AttemptError::Bad,
            ) => Some(Failure::Reset),
            Err(AttemptError::Connect(_)) => {
                w.metrics.connect_failed(group.index, ep);
                Some(Failure::Connect)
            }
            Err(AttemptError::Timeout) => Some(Failure::Timeout),
            Err(AttemptError::Down(_) | AttemptError::Overloaded) => None,
        };
        let upstream_judged = r.as_ref().err().is_none_or(|e| e.upstream_side());
        let eligible = failure.is_some_and(|f| {
            policy.is_some_and(|p| {
                tries < p.attempts
                    && p.retries_on(f)
                    && replayed
                    && (idempotent || f == Failure::Connect || p.non_idempotent)
                    && o.deadline.is_none_or(|d| {
                        Instant::now()
                            .checked_add(p.backoff_cap(tries))
                            .is_some_and(|t| t < d)
                    })
            })
        });
        let retry = eligible && policy.is_some_and(|p| p.take_retry(Instant::now()));
        if retry {
            rec.retries = rec.retries.saturating_add(1);
        } else if eligible {
            rec.retry_budget_refusals = rec.retry_budget_refusals.saturating_add(1);
        }
        if retry || r.is_err() {
            stats.outstanding.set(stats.outstanding.get() - 1);
            if upstream_judged {
                record_outcome(w, group, ep, probe, failure.is_some());
            } else if let Some(b) = &group.breaker {
                b.cancel(probe);
            }
        }
        match (r, retry, policy) {
            (r, true, Some(p)) => {
                drop(r);
                resp.raw = bytes::Bytes::new();
                monoio::time::sleep(p.backoff(tries)).await;
            }
            (Ok(up), _, _) => {
                return Ok(Chosen {
                    up,
                    probe,
                    failed: failure.is_some(),
                })
            }
            (Err(e), _, _) => return Err(e),
        }
    }
}

/// The consistent-hashing key of this request.
fn hash_key<S>(on: &HashOn, c: &Conn<S>, ctx: &RequestCtx<'_>) -> u64 {
    let value: Option<&[u8]> = match on {
        HashOn::ClientIp => None,
        HashOn::Header(name) => ctx.head.header(name.as_bytes()),
        HashOn::Cookie(name) => ctx.head.header_values(b"cookie").find_map(|v| {
            v.split(|b| *b == b';').find_map(|kv| {
                let kv = crate::http::trim_ows(kv);
                kv.strip_prefix(name.as_bytes())
                    .and_then(|rest| rest.strip_prefix(b"="))
            })
        }),
    };
    hash_bytes(value.unwrap_or(c.peer.as_bytes()))
}

/// Feeds an upstream outcome to the circuit breaker and to outlier detection: consecutive
/// failures seen by this worker eject the endpoint for every worker (through the hub).
pub(crate) fn record_outcome(
    w: &Worker,
    group: &UpstreamGroup,
    ep: usize,
    probe: Probe,
    failed: bool,
) {
    if let Some(b) = &group.breaker {
        b.done(probe, !failed, Instant::now());
    }
    let s = &group.stats[ep];
    if !failed {
        s.failures.set(0);
        return;
    }
    let f = s.failures.get() + 1;
    s.failures.set(f);
    let limit = group.outlier.consecutive_failures;
    if limit > 0 && f >= limit {
        s.failures.set(0);
        match w
            .hub
            .try_eject(group.index, ep, &group.outlier, Instant::now())
        {
            Ejection::Ejected(d) => {
                s.routable.set(false);
                w.metrics.ejected(group.index, ep);
                warn!(
                    "outlier detection: {} of upstream {} ejected for {:?} after {f} consecutive failures",
                    group.endpoints[ep].addr, group.name, d
                );
            }
            // Another worker was first: stop using it here too, before the next sync.
            Ejection::Already => s.routable.set(false),
            Ejection::Refused => {}
        }
    }
}
