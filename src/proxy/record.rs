//! The end of a request: one step, [`done`], called by the connection once the request's
//! response is finished however it ended (relayed, answered by the gateway, cut off), which
//! adds the request to the worker's metrics and writes its access log line.
//!
//! The facts are gathered as the request goes into its [`Record`] (part of the request
//! context), reusing the clock readings the request path takes anyway: one at the start, one
//! when the upstream phase begins, one when the final response head arrives (shared with the
//! balancer's latency sample), one at the end. With metrics and the access log both off, no
//! clock is read for them. Nothing here allocates.

use std::time::Instant;

use crate::error::GatewayError;
use crate::metrics::Done;
use crate::trace::TraceContext;

use super::conn::Conn;
use super::ctx::RequestCtx;
use super::worker::{Snapshot, Worker};

/// What the end of a request needs, filled in as the request goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Record {
    /// When the request began (`None`: requests are not timed on this worker).
    pub start: Option<Instant>,
    /// When the upstream phase began (its first attempt).
    pub upstream_start: Option<Instant>,
    /// First attempt to the final response head, in microseconds.
    pub upstream_us: Option<u64>,
    /// The status written to the client; 0 while none was.
    pub status: u16,
    /// The gateway error answered, if any.
    pub error: Option<GatewayError>,
    /// The kind of an error answer made without a `GatewayError` (a failed composition).
    pub kind: Option<&'static str>,
    /// The upstream group (index), once the upstream phase began.
    pub group: Option<usize>,
    /// The endpoint of the last attempt.
    pub endpoint: Option<usize>,
    /// Attempts after the first (policy retries; the free resend on a stale pooled
    /// connection is not one).
    pub retries: u32,
    /// Retries the retry budget refused.
    pub retry_budget_refusals: u32,
    /// Bytes written to the client.
    pub bytes_out: u64,
    /// The head was parsed (its method, host and path can be read).
    pub head_ok: bool,
    pub trace: TraceContext,
}

impl Record {
    /// The upstream phase begins (its first attempt): `now` is a clock reading taken there.
    #[inline]
    pub fn upstream_began(&mut self, now: Option<Instant>, group: usize) {
        self.group = Some(group);
        if self.start.is_some() {
            self.upstream_start = now;
        }
    }

    /// The final response head arrived at `now`.
    #[inline]
    pub fn upstream_answered(&mut self, now: Instant) {
        if let Some(t0) = self.upstream_start {
            self.upstream_us = Some(micros(now.saturating_duration_since(t0)));
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// The end of a sub-request the gateway made itself (a composition's call, through
/// `forward::try_endpoints` with `rec`), counted in its upstream group's metrics as a proxied
/// request is there: `status` (0: none came), the gateway error it ended with, total and
/// upstream latency, the bytes sent (`bytes_in`: head and body) and received (`bytes_out`),
/// retries. Not in the route's: the client request is counted once, by [`done`]. `rec.start`
/// is `None` when metrics are off (then nothing is counted and no clock was read).
pub fn sub_request_done(
    w: &Worker,
    rec: &Record,
    status: u16,
    error: Option<GatewayError>,
    bytes_in: u64,
    bytes_out: u64,
) {
    let (Some(start), Some(group)) = (rec.start, rec.group) else {
        return;
    };
    let total_us = micros(start.elapsed());
    let d = Done {
        status,
        error,
        kind: None,
        total_us: Some(total_us),
        upstream_us: rec.upstream_us,
        bytes_in,
        bytes_out,
        retries: rec.retries,
        retry_budget_refusals: rec.retry_budget_refusals,
    };
    w.metrics.record_group(group, &d);
}

/// The one step at the end of every request: metrics, then the access log line.
pub fn done<S>(w: &Worker, cfg: &Snapshot, c: &Conn<S>, ctx: &RequestCtx<'_>) {
    let r = &ctx.rec;
    let Some(start) = r.start else {
        // Untimed: metrics are off and nothing logs.
        return;
    };
    let end = Instant::now();
    let total_us = micros(end.saturating_duration_since(start));
    let bytes_in = if r.head_ok {
        (ctx.head.raw.len() as u64).saturating_add(ctx.body.wire())
    } else {
        0
    };
    let d = Done {
        status: r.status,
        error: r.error,
        kind: r.kind,
        total_us: Some(total_us),
        upstream_us: r.upstream_us,
        bytes_in,
        bytes_out: r.bytes_out,
        retries: r.retries,
        retry_budget_refusals: r.retry_budget_refusals,
    };
    w.metrics.record(ctx.route, r.group, &d);
    let Some(log) = w.access_log.get() else {
        return;
    };
    let listener = c.info.listener;
    if !log.logs(listener) {
        return;
    }
    // `r.group` is the group's slot (`UpstreamGroup::index`), which a reload keeps for a kept
    // group while its position in the config may change.
    // Slot and position agree until a reload removes a group before it: look there first
    // rather than scan every group for each line.
    let group = r.group.and_then(|g| {
        cfg.upstreams
            .get(g)
            .filter(|u| u.index == g)
            .or_else(|| cfg.upstreams.iter().find(|u| u.index == g))
    });
    let trace_id = r.trace.trace_id_hex();
    let head = &ctx.head;
    let entry = crate::access_log::Entry {
        end,
        request_id: ctx.id.as_bytes(),
        trace_id: &trace_id,
        client: c.peer.as_bytes(),
        method: r.head_ok.then(|| head.method_str()),
        host: if r.head_ok { head.host_bytes() } else { None },
        path: r.head_ok.then(|| head.bytes(head.path_query)),
        redact_query: ctx.auth.api_key_query(),
        status: r.status,
        bytes_in,
        bytes_out: r.bytes_out,
        total_us,
        upstream_us: r.upstream_us,
        route: ctx
            .route
            .and_then(|i| cfg.router.routes.get(i))
            .map(|r| r.name.as_str()),
        upstream: group.map(|g| g.name.as_str()),
        endpoint: group
            .zip(r.endpoint)
            .and_then(|(g, e)| g.endpoints.get(e))
            .map(|e| e.addr),
        consumer: ctx.identity.consumer_name(),
        error: r.error.map(|e| e.code()).or(r.kind),
        retries: r.retries,
        tls: c.info.tls_version,
    };
    match log.log(listener, &entry) {
        crate::access_log::Logged::Written => {
            let m = &w.metrics.access_log_lines;
            m.set(m.get().wrapping_add(1));
        }
        crate::access_log::Logged::Dropped => {
            let m = &w.metrics.access_log_dropped;
            m.set(m.get().wrapping_add(1));
        }
        crate::access_log::Logged::Skipped => {}
    }
}
