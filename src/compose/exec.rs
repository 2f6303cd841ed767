//! The executor: calls start as soon as the calls they refer to are done (independent ones
//! at once, as futures polled together on the worker's runtime: thread-per-core, nothing is
//! `Send`), each sub-request goes through `forward::try_endpoints` (balancer, breaker,
//! health, retries, the pool) with an [`InMemory`] body, and the answer is assembled in
//! declared order once every call has ended.
//!
//! A failed required call keeps only the last step (the one with side effects) from
//! starting: the other calls still run, so that which failure the answer names (the first
//! in declared order) never depends on which failed first. Answers that together go over
//! `max_total_bytes` stop every call from starting: the answer is then `compose_too_large`,
//! whichever call's bytes came last. Calls already running are let finish (each within its
//! deadline) rather than dropped, so that no endpoint's in-flight count, breaker probe or
//! pooled connection is left half-settled.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::Value;

use crate::error::GatewayError;
use crate::http::chunked::ChunkedScanner;
use crate::http::response::{RespBody, ResponseHead};
use crate::http::Version;
use crate::local::Notify;
use crate::proxy::attempt::InMemory;
use crate::proxy::conn::{read_some, IoFail};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::forward::{settle, try_endpoints, TryOpts};
use crate::proxy::{Snapshot, Timeouts, Worker};
use crate::router::{PathMatch, Route};
use crate::upstream::balance::hash_bytes;
use crate::upstream::{UpConn, UPSTREAM_READ_BUF};

use super::config::{BatchAs, Call, Plan, Shape};
use super::merge::{self, Piece};
use super::template::{
    percent_decode, percent_encode, put_value, query_param, Ctx, Part, Ref, Template, Val,
};

/// Longest request target a call may render (path and query).
pub const MAX_SUB_TARGET: usize = 8 * 1024;
/// Longest header block a call may render.
pub const MAX_SUB_HEADERS: usize = 16 * 1024;
/// Most header fields of a call's answer kept for `${calls.<id>.header.<name>}`.
const MAX_KEPT_HEADERS: usize = 64;
/// Deepest nesting of arrays and objects in a call's answer: what serde_json parses (its
/// recursion limit of 128 refuses the 128th level), applied to answers passed on unparsed too.
pub const MAX_JSON_DEPTH: usize = 127;
/// Header fields a status needs with it, relayed when `pass_status` passes a call's status on:
/// a 401 must carry WWW-Authenticate (RFC 9110 §11.6.1, §15.5.2), a 405 Allow (§15.5.6), a
/// 407 Proxy-Authenticate (§11.7.1, §15.5.8).
pub const FIELDS_WITH_STATUS: [&str; 3] = ["www-authenticate", "allow", "proxy-authenticate"];

/// The member of the answer that lists failed calls, with `errors_field = true`.
pub const ERRORS_FIELD: &str = "_errors";

/// A composed answer (or a composition's error answer), written by `Conn::finish`.
#[derive(Debug)]
pub struct Composed {
    pub status: u16,
    /// JSON.
    pub body: Vec<u8>,
    /// Header lines (each ending in CRLF): `ringway-partial`, the route's response headers.
    pub headers: Vec<u8>,
    /// For a failed composition, its error kind (`compose_call_failed`, ...: a
    /// [`crate::metrics::ERROR_KINDS`] entry), counted and logged like a gateway error.
    pub kind: Option<&'static str>,
    /// The route's `response_headers` decide Content-Type: the gateway writes none.
    pub own_type: bool,
    /// The same for Date (RFC 9110 §6.6.1).
    pub own_date: bool,
}

/// Why a call failed, in words for the answer.
#[derive(Clone, Debug)]
pub struct Fail {
    pub reason: String,
    /// The call ran out of time.
    pub timeout: bool,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    /// Header lines of that answer (each ending in CRLF) that go with its status when the
    /// route passes it on: see [`FIELDS_WITH_STATUS`].
    pub status_fields: Vec<u8>,
    /// The failure is a dependency's, not the call's own.
    pub inherited: bool,
}

impl Fail {
    fn new(reason: impl Into<String>) -> Fail {
        Fail {
            reason: reason.into(),
            timeout: false,
            status: None,
            status_fields: Vec::new(),
            inherited: false,
        }
    }
}

/// An answer read in full.
struct Fetched {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Its header lines named in [`FIELDS_WITH_STATUS`] (each ending in CRLF).
    status_fields: Vec<u8>,
    /// The answer's content codings other than `identity` (RFC 9110 §8.4), lower-case and
    /// comma-separated, if any: such a body is not JSON text as it stands.
    coding: Option<String>,
    /// The answer's media type (its Content-Type without parameters, lower-case), when it
    /// has one that is not JSON: such a body is not taken for JSON text (RFC 9110 §8.3).
    not_json_type: Option<String>,
}

/// A call's result.
struct CallOut {
    status: u16,
    /// The answer it came from (none for a `for_each`).
    fetched: Option<Rc<Fetched>>,
    /// The parsed answer (`Null` when the call needs no tree: see `Call::tree`).
    body: Value,
}

/// A sub-request that identical GETs of the same client request share.
struct Slot {
    done: RefCell<Option<Result<Rc<Fetched>, Fail>>>,
    notify: Notify,
    /// The deadline of the call that makes it: a call with a later one does not take its
    /// running out of time for an answer (see [`Env::fetch`]).
    deadline: Instant,
    /// It ended by running into that deadline.
    cut_short: Cell<bool>,
}

/// A rendered sub-request.
struct SubReq {
    target: Vec<u8>,
    headers: Vec<u8>,
    body: Option<Vec<u8>>,
}

struct Env<'a> {
    w: &'a Worker,
    cfg: &'a Snapshot,
    route: &'a Route,
    plan: &'a Plan,
    head: &'a crate::http::request::RequestHead,
    identity: &'a crate::auth::Identity,
    /// Identity and trace header lines passed to every call.
    passed: Vec<u8>,
    t: Timeouts,
    deadline: Instant,
    /// Body bytes the request's calls may still take (`max_total_bytes`).
    budget: Cell<usize>,
    /// The calls' answers went over `max_total_bytes`: no more calls or batches start, and
    /// the answer is `compose_too_large` (the same whichever answer came last).
    over: Cell<bool>,
    dedup: RefCell<HashMap<Vec<u8>, Rc<Slot>>>,
    done: RefCell<Vec<Option<Rc<CallOut>>>>,
}

/// Futures polled together on this task: the next to finish comes out first.
struct Running<'a, T> {
    futs: Vec<Pin<Box<dyn Future<Output = T> + 'a>>>,
}

impl<'a, T> Running<'a, T> {
    fn new() -> Self {
        Running { futs: Vec::new() }
    }

    fn push(&mut self, f: impl Future<Output = T> + 'a) {
        self.futs.push(Box::pin(f));
    }

    fn len(&self) -> usize {
        self.futs.len()
    }

    async fn next(&mut self) -> Option<T> {
        if self.futs.is_empty() {
            return None;
        }
        std::future::poll_fn(|cx| {
            for i in 0..self.futs.len() {
                if let Poll::Ready(v) = self.futs[i].as_mut().poll(cx) {
                    drop(self.futs.swap_remove(i));
                    return Poll::Ready(Some(v));
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    Waiting,
    Running,
    Ok,
    Failed,
}

/// Runs a route's composition for the request in `ctx`.
pub async fn run(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    plan: &Plan,
    ctx: &RequestCtx<'_>,
) -> Composed {
    let mut passed = Vec::with_capacity(ctx.auth_headers.len() + 128);
    passed.extend_from_slice(b"x-request-id: ");
    passed.extend_from_slice(ctx.id.as_bytes());
    passed.extend_from_slice(b"\r\n");
    // W3C Trace Context: every call carries the request's trace with the gateway's span as
    // its parent, as a proxied request does (the trace id the access log records), and the
    // client's `tracestate` only where the proxied path would pass it (see `crate::trace`).
    passed.extend_from_slice(b"traceparent: ");
    passed.extend_from_slice(&ctx.rec.trace.traceparent());
    passed.extend_from_slice(b"\r\n");
    let tracestate = ctx.head.header_values(b"tracestate");
    crate::trace::put_tracestate(&mut passed, tracestate, ctx.rec.trace.keep_state);
    passed.extend_from_slice(&ctx.auth_headers);
    let deadline = Instant::now()
        .checked_add(plan.deadline)
        .unwrap_or_else(Instant::now);
    let env = Env {
        w,
        cfg,
        route,
        plan,
        head: &ctx.head,
        identity: &ctx.identity,
        passed,
        t: ctx.t,
        deadline,
        budget: Cell::new(plan.max_total_bytes),
        over: Cell::new(false),
        dedup: RefCell::new(HashMap::new()),
        done: RefCell::new((0..plan.calls.len()).map(|_| None).collect()),
    };
    let fails = env.schedule().await;
    let trace_id = ctx.rec.trace.trace_id_hex();
    let ids = Ids {
        request: ctx.id.as_bytes(),
        trace: std::str::from_utf8(&trace_id).unwrap_or(""),
    };
    let mut out = env.assemble(fails, &ids);
    // The route's `response_headers` decide the fields they name (as on a proxied answer): the
    // gateway's own line of such a field (`ringway-partial`, a passed status's
    // `www-authenticate`, Content-Type) is left out, not doubled (RFC 9110 §5.3).
    let rules = &route.response_headers;
    let mut kept = Vec::with_capacity(out.headers.len());
    for line in out.headers.split_inclusive(|b| *b == b'\n') {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        if !rules.decides(name) {
            kept.extend_from_slice(line);
        }
    }
    out.headers = kept;
    out.own_type = rules.decides(b"content-type");
    out.own_date = rules.decides(b"date");
    let mut h = BytesMut::new();
    rules.put(&mut h);
    out.headers.extend_from_slice(&h);
    out
}

impl<'a> Env<'a> {
    /// Runs the calls; returns each call's failure, if it failed.
    async fn schedule(&self) -> Vec<Option<Fail>> {
        let calls = &self.plan.calls;
        let n = calls.len();
        let mut st = vec![St::Waiting; n];
        let mut fails: Vec<Option<Fail>> = vec![None; n];
        let mut running: Running<'_, (usize, Result<CallOut, Fail>)> = Running::new();
        let mut stop = false;
        loop {
            let mut changed = true;
            while changed && !self.over.get() {
                changed = false;
                for i in 0..n {
                    if st[i] != St::Waiting {
                        continue;
                    }
                    let c = &calls[i];
                    let ready = if c.last {
                        (0..n).all(|j| j == i || matches!(st[j], St::Ok | St::Failed))
                    } else {
                        c.deps.iter().all(|d| matches!(st[*d], St::Ok | St::Failed))
                    };
                    if !ready {
                        continue;
                    }
                    if let Some(d) = c.deps.iter().find(|d| st[**d] == St::Failed) {
                        st[i] = St::Failed;
                        fails[i] = Some(Fail {
                            inherited: true,
                            ..Fail::new(format!("depends on {:?}, which failed", calls[*d].id))
                        });
                        stop |= c.required;
                        changed = true;
                        continue;
                    }
                    if c.last && stop {
                        // Not run: a required call failed (see the module's doc).
                        continue;
                    }
                    st[i] = St::Running;
                    running.push(async move { (i, self.run_call(i).await) });
                }
            }
            let Some((i, r)) = running.next().await else {
                break;
            };
            match r {
                Ok(out) => {
                    self.done.borrow_mut()[i] = Some(Rc::new(out));
                    st[i] = St::Ok;
                }
                Err(f) => {
                    st[i] = St::Failed;
                    fails[i] = Some(f);
                    stop |= calls[i].required;
                }
            }
        }
        // Calls never started (the last step after a required call failed, or any call once
        // the answers went over max_total_bytes) are failed by that.
        for i in 0..n {
            if st[i] == St::Waiting {
                fails[i] = Some(Fail {
                    inherited: true,
                    ..Fail::new("not run: a required call failed")
                });
            }
        }
        fails
    }

    /// One call: a request, or a `for_each` fan-out.
    async fn run_call(&self, i: usize) -> Result<CallOut, Fail> {
        let call = &self.plan.calls[i];
        let deadline = call
            .timeout
            .and_then(|t| Instant::now().checked_add(t))
            .map_or(self.deadline, |d| d.min(self.deadline));
        let Some(fe) = &call.for_each else {
            let req = self.render(call, None, None).map_err(Fail::new)?;
            let f = self.fetch(call, req, deadline).await?;
            return to_out(call, &f);
        };
        let ids = {
            let done = self.done.borrow();
            let src = done[fe.source]
                .as_ref()
                .ok_or_else(|| Fail::new("its source call has no result"))?;
            merge::items(&src.body, fe).map_err(Fail::new)?
        };
        let batches: Vec<&[Value]> = ids.chunks(fe.batch).collect();
        let mut results: Vec<Vec<Value>> = vec![Vec::new(); batches.len()];
        let mut running: Running<'_, (usize, Result<Vec<Value>, Fail>)> = Running::new();
        let mut next = 0;
        let mut err: Option<(usize, Fail)> = None;
        loop {
            // A failed batch does not stop the others: the failure named is the first batch's
            // in order, whatever the timing, and the bytes read do not depend on it either.
            while !self.over.get() && running.len() < fe.concurrency && next < batches.len() {
                let (k, b) = (next, batches[next]);
                next += 1;
                running.push(async move { (k, self.fetch_batch(call, b, deadline).await) });
            }
            match running.next().await {
                None => break,
                Some((k, Ok(v))) => results[k] = v,
                Some((k, Err(f))) => {
                    if err.as_ref().is_none_or(|(first, _)| k < *first) {
                        err = Some((k, f));
                    }
                }
            }
        }
        if let Some((k, mut f)) = err {
            f.reason = format!("batch {} of {}: {}", k + 1, batches.len(), f.reason);
            return Err(f);
        }
        Ok(CallOut {
            status: 200,
            fetched: None,
            body: Value::Array(results.into_iter().flatten().collect()),
        })
    }

    /// One sub-request of a `for_each`: its results (an array answer gives one per element),
    /// extracted and with `pick`/`omit`/`rename` applied to each.
    async fn fetch_batch(
        &self,
        call: &Call,
        ids: &[Value],
        deadline: Instant,
    ) -> Result<Vec<Value>, Fail> {
        let fe = call
            .for_each
            .as_ref()
            .ok_or_else(|| Fail::new("not a for_each"))?;
        let item = (fe.batch == 1).then(|| &ids[0]);
        let req = self.render(call, item, Some(ids)).map_err(Fail::new)?;
        let f = self.fetch(call, req, deadline).await?;
        let out = to_out(call, &f)?;
        let s = &call.shape;
        let per = Shape {
            extract: s.extract.clone(),
            pick: s.pick.clone(),
            omit: s.omit.clone(),
            rename: s.rename.clone(),
            ..Shape::default()
        };
        match merge::shape(out.body, &per).map_err(Fail::new)? {
            Value::Array(a) => Ok(a),
            v => Ok(vec![v]),
        }
    }

    /// Renders a call's request for this client request (and item or batch of ids).
    fn render(
        &self,
        call: &Call,
        item: Option<&Value>,
        batch: Option<&[Value]>,
    ) -> Result<SubReq, String> {
        let mut target = Vec::with_capacity(128);
        for p in &call.path.parts {
            match p {
                Part::Lit(l) => target.extend_from_slice(l.as_bytes()),
                Part::Ref(r) => {
                    let at = target.len();
                    self.put_ref(&mut target, r, item, Ctx::Url)?;
                    // An empty value would remove a segment or part of one: `/orders/${id}`
                    // would become `/orders/`, typically the collection. Like a dot-segment, it
                    // leads to another resource (RFC 3986 §3.3), so the call fails instead.
                    if target.len() == at {
                        return Err(
                            "a value in its path is empty (missing, null or \"\"), which would lead to another resource"
                                .into(),
                        );
                    }
                }
            }
        }
        // '.' is unreserved (RFC 3986 §2.3): a value of "." or ".." stays one when encoded, and
        // a server resolves such a segment to another resource (§5.2.4).
        if target
            .get(1..)
            .unwrap_or_default()
            .split(|b| *b == b'/')
            .any(|seg| seg == b"." || seg == b"..")
        {
            return Err(
                "its path would hold a dot-segment ('.' or '..', RFC 3986 §3.3), which leads to another resource"
                    .into(),
            );
        }
        let mut sep = b'?';
        for (name, t) in &call.query {
            target.push(sep);
            sep = b'&';
            target.extend_from_slice(name.as_bytes());
            target.push(b'=');
            let mut v = Vec::new();
            for p in &t.parts {
                match p {
                    Part::Lit(l) => v.extend_from_slice(l.as_bytes()),
                    Part::Ref(r) => {
                        let at = v.len();
                        self.put_ref(&mut v, r, item, Ctx::Raw)?;
                        // A value the gateway derived (an answer's header, a claim, the
                        // consumer) that writes nothing would turn a filter into none
                        // (`tenant=`); only what the client itself sent may be empty.
                        let from_client =
                            matches!(r, Ref::Query(_) | Ref::Header(_) | Ref::PathCapture(_));
                        if v.len() == at && !from_client {
                            return Err(format!(
                                "the value of its query parameter {name:?} is empty (missing), which would widen the request"
                            ));
                        }
                    }
                }
            }
            percent_encode(&mut target, &v);
        }
        let fe = call.for_each.as_ref();
        let mut body = None;
        if let (Some(fe), Some(ids)) = (fe, batch) {
            match (fe.batch_as, &fe.batch_param) {
                (BatchAs::Json, _) => body = Some(serde_json::to_vec(ids).unwrap_or_default()),
                (BatchAs::Repeat, Some(p)) => {
                    for id in ids {
                        target.push(sep);
                        sep = b'&';
                        target.extend_from_slice(p.as_bytes());
                        target.push(b'=');
                        put_value(&mut target, Val::Json(Cow::Borrowed(id)), Ctx::Url)?;
                    }
                }
                (BatchAs::Comma, Some(p)) => {
                    target.push(sep);
                    target.extend_from_slice(p.as_bytes());
                    target.push(b'=');
                    for (k, id) in ids.iter().enumerate() {
                        if k > 0 {
                            target.push(b',');
                        }
                        put_value(&mut target, Val::Json(Cow::Borrowed(id)), Ctx::Url)?;
                    }
                }
                (_, None) => {}
            }
        }
        if target.len() > MAX_SUB_TARGET {
            return Err(format!("its request target is over {MAX_SUB_TARGET} bytes"));
        }
        let mut headers = Vec::with_capacity(256);
        if !call.headers.iter().any(|(n, _)| n == "accept") {
            headers.extend_from_slice(b"accept: application/json\r\n");
        }
        // Without Accept-Encoding any content coding is acceptable (RFC 9110 §12.5.3), and
        // answers are read as JSON text: ask for none.
        if !call.headers.iter().any(|(n, _)| n == "accept-encoding") {
            headers.extend_from_slice(b"accept-encoding: identity\r\n");
        }
        for (name, t) in &call.headers {
            headers.extend_from_slice(name.as_bytes());
            headers.extend_from_slice(b": ");
            self.render_into(&mut headers, t, item, Ctx::Header)?;
            headers.extend_from_slice(b"\r\n");
        }
        headers.extend_from_slice(&self.passed);
        if headers.len() > MAX_SUB_HEADERS {
            return Err(format!("its header block is over {MAX_SUB_HEADERS} bytes"));
        }
        if let Some(t) = &call.body {
            let mut b = Vec::new();
            self.render_into(&mut b, t, item, Ctx::Json)?;
            body = Some(b);
        }
        Ok(SubReq {
            target,
            headers,
            body,
        })
    }

    fn render_into(
        &self,
        out: &mut Vec<u8>,
        t: &Template,
        item: Option<&Value>,
        ctx: Ctx,
    ) -> Result<(), String> {
        for p in &t.parts {
            match p {
                Part::Lit(l) => out.extend_from_slice(l.as_bytes()),
                Part::Ref(r) => self.put_ref(out, r, item, ctx)?,
            }
        }
        Ok(())
    }

    /// Appends the value a reference reads.
    fn put_ref(
        &self,
        out: &mut Vec<u8>,
        r: &Ref,
        item: Option<&Value>,
        ctx: Ctx,
    ) -> Result<(), String> {
        let head = self.head;
        let v: Val<'_> = match r {
            Ref::PathCapture(c) => match &self.route.path {
                PathMatch::Regex(re) => {
                    let caps = re.captures(head.path_bytes());
                    let m = caps.as_ref().and_then(|c2| match c {
                        super::template::Capture::Name(n) => c2.name(n),
                        super::template::Capture::Index(i) => c2.get(*i),
                    });
                    match m {
                        // The path is matched as the client sent it, percent-encoded: the
                        // capture is decoded (as a query value is) so that a path segment
                        // re-encodes it once, not twice (RFC 3986 §2.4).
                        Some(m) => Val::Bytes(Cow::Owned(percent_decode(m.as_bytes()))),
                        None => Val::Missing,
                    }
                }
                _ => Val::Missing,
            },
            Ref::Query(name) => {
                let pq = head.bytes(head.path_query);
                let q = pq
                    .iter()
                    .position(|b| *b == b'?')
                    .map_or(&b""[..], |p| &pq[p + 1..]);
                match query_param(q, name) {
                    Some(v) => Val::Bytes(Cow::Owned(v)),
                    None => Val::Missing,
                }
            }
            Ref::Header(name) => match head.header(name.as_bytes()) {
                Some(v) => Val::Bytes(Cow::Borrowed(v)),
                None => Val::Missing,
            },
            Ref::Consumer => match self.identity.consumer_name() {
                Some(n) => Val::Bytes(Cow::Borrowed(n.as_bytes())),
                None => Val::Missing,
            },
            Ref::Claim(c) => match self.identity.claim(c) {
                Some(v) => Val::Json(Cow::Borrowed(v)),
                None => Val::Missing,
            },
            Ref::Item => match item {
                Some(v) => Val::Json(Cow::Borrowed(v)),
                None => Val::Missing,
            },
            Ref::Body(c, _) | Ref::Status(c) | Ref::RespHeader(c, _) => {
                let done = self.done.borrow();
                let id = &self.plan.calls[*c].id;
                let out_c = done[*c]
                    .as_ref()
                    .ok_or_else(|| format!("call {id:?} has no result"))?;
                let v = match r {
                    Ref::Status(_) => Val::Json(Cow::Owned(Value::from(out_c.status))),
                    Ref::RespHeader(_, name) => {
                        let f = out_c.fetched.as_ref();
                        match f.and_then(|f| f.headers.iter().find(|(n, _)| n == name)) {
                            Some((_, v)) => Val::Bytes(Cow::Owned(v.clone())),
                            None => Val::Missing,
                        }
                    }
                    Ref::Body(_, p) => match out_c.body.pointer(p) {
                        Some(v) => Val::Json(Cow::Owned(v.clone())),
                        None => {
                            return Err(format!(
                                "`${{calls.{id}.body{p}}}`: nothing at that pointer in its answer"
                            ))
                        }
                    },
                    _ => Val::Missing,
                };
                return put_value(out, v, ctx);
            }
        };
        put_value(out, v, ctx)
    }

    /// A sub-request, made once per client request when it is a GET or HEAD identical to
    /// another (same upstream, method, target and headers).
    async fn fetch(
        &self,
        call: &Call,
        req: SubReq,
        deadline: Instant,
    ) -> Result<Rc<Fetched>, Fail> {
        if !call.safe() {
            return self.fetch_now(call, req, deadline).await.map(Rc::new);
        }
        let mut key = Vec::with_capacity(req.target.len() + req.headers.len() + 16);
        key.extend_from_slice(&(call.group as u64).to_le_bytes());
        key.extend_from_slice(call.method.as_bytes());
        key.push(b' ');
        key.extend_from_slice(&req.target);
        key.push(b'\n');
        key.extend_from_slice(&req.headers);
        // A slot cut short by its maker's deadline may have been made again by a call with
        // more time: each newer slot has a later deadline, so this ends.
        loop {
            // (A statement of its own: the map is not borrowed across the wait.)
            let existing = self.dedup.borrow().get(&key).cloned();
            let Some(slot) = existing else { break };
            let wait = async {
                loop {
                    if let Some(r) = slot.done.borrow().clone() {
                        return r;
                    }
                    slot.notify.notified().await;
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let r = match monoio::time::timeout(left, wait).await {
                Ok(r) => r,
                Err(_) => Err(timeout_fail()),
            };
            // The shared request ran out of the time its maker had (a call with a shorter
            // `timeout`): that is no answer to this call, which has time left and makes the
            // request itself (and shares it from now on), unless another call already did.
            if !(slot.cut_short.get() && slot.deadline < deadline && Instant::now() < deadline) {
                return r;
            }
            let remade = self
                .dedup
                .borrow()
                .get(&key)
                .is_some_and(|s| !Rc::ptr_eq(s, &slot));
            if !remade {
                break;
            }
        }
        let slot = Rc::new(Slot {
            done: RefCell::new(None),
            notify: Notify::default(),
            deadline,
            cut_short: Cell::new(false),
        });
        self.dedup.borrow_mut().insert(key, slot.clone());
        let r = self.fetch_now(call, req, deadline).await.map(Rc::new);
        slot.cut_short
            .set(matches!(&r, Err(f) if f.timeout) && Instant::now() >= deadline);
        *slot.done.borrow_mut() = Some(r.clone());
        slot.notify.notify_all();
        r
    }

    /// One sub-request through the upstream path, its answer read in full.
    async fn fetch_now(
        &self,
        call: &Call,
        req: SubReq,
        deadline: Instant,
    ) -> Result<Fetched, Fail> {
        if self.over.get() {
            return Err(over_total());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout_fail());
        }
        let group = &self.cfg.upstreams[call.group];
        // Every step of the exchange ends by the call's deadline.
        let mut t = self.t;
        t.upstream_connect = t.upstream_connect.min(left);
        t.upstream_write = t.upstream_write.min(left);
        t.upstream_response = t.upstream_response.min(left);
        t.upstream_body = t.upstream_body.min(left);
        let head_request = &*call.method == "HEAD";
        let o = TryOpts {
            policy: self.route.retry.as_ref(),
            idempotent: matches!(&*call.method, "GET" | "HEAD" | "PUT" | "DELETE"),
            replayed: true,
            // A consistent-hashing group hashes the request target: the same resource goes
            // to the same endpoint.
            hash: group.hash_on.as_ref().map(|_| hash_bytes(&req.target)),
            head_request,
            t,
            deadline: Some(deadline),
        };
        let body = req.body.unwrap_or_default();
        let has_body = !body.is_empty() || !call.safe();
        // A call's own Content-Type (a `+json` type, say) replaces the gateway's: one field
        // line (RFC 9110 §8.3 gives it one value).
        let own_type = call.headers.iter().any(|(n, _)| n == "content-type");
        let blen = body.len();
        let mut down = InMemory(Bytes::from(body));
        let mut ubuf = self.w.bufs.take();
        let mut resp = self.w.bufs.take_resp();
        let method = call.method.as_bytes();
        // Sub-requests are not the client request's upstream phase: their timing and retries
        // are recorded apart, and counted in their group's metrics (`sub_request_done`).
        let mut rec = crate::proxy::record::Record {
            start: self.w.metrics.enabled.then(Instant::now),
            ..Default::default()
        };
        let head_len = Cell::new(0usize);
        let r = try_endpoints(
            self.w,
            group,
            &o,
            &mut down,
            &mut ubuf,
            &mut resp,
            &mut rec,
            |out, ep| {
                out.clear();
                out.put_slice(method);
                out.put_u8(b' ');
                out.put_slice(&req.target);
                out.put_slice(b" HTTP/1.1\r\nhost: ");
                out.put_slice(&group.endpoints[ep].authority);
                out.put_slice(b"\r\n");
                out.put_slice(&req.headers);
                if has_body {
                    if !own_type {
                        out.put_slice(b"content-type: application/json\r\n");
                    }
                    out.put_slice(b"content-length: ");
                    crate::http::encode::put_u64(out, blen as u64);
                    out.put_slice(b"\r\n");
                }
                out.put_slice(b"\r\n");
                head_len.set(out.len());
            },
        )
        .await;
        self.w.bufs.give(ubuf);
        let sent = (head_len.get() as u64).saturating_add(blen as u64);
        let result = match r {
            Err(e) => {
                let g = e.answer();
                if rec.upstream_start.is_some() {
                    // A failed sub-request took this long (an error path: one more reading).
                    rec.upstream_answered(Instant::now());
                }
                crate::proxy::record::sub_request_done(
                    self.w,
                    &rec,
                    g.map_or(0, |g| g.status()),
                    g,
                    sent,
                    0,
                );
                Err(Fail {
                    reason: g
                        .map_or("the request could not be sent", |g| g.message())
                        .into(),
                    timeout: g.is_some_and(|g| g.status() == 504),
                    ..Fail::new("")
                })
            }
            Ok(ch) => {
                let mut up = ch.up;
                // Each answer is read up to the call cap whatever others took, so that whether
                // it fits does not depend on timing; the total is checked as it ends.
                let cap = self.plan.max_call_bytes;
                let read =
                    read_body(&mut up, &resp, head_request, cap, deadline, t.upstream_body).await;
                let mut headers = Vec::new();
                let keep = if self.plan.keep_headers {
                    MAX_KEPT_HEADERS
                } else {
                    0
                };
                let mut coding = String::new();
                let mut not_json_type = None;
                let mut status_fields = Vec::new();
                for h in &resp.headers {
                    let name = resp.bytes(h.name);
                    if let Some(n) = FIELDS_WITH_STATUS
                        .iter()
                        .find(|n| name.eq_ignore_ascii_case(n.as_bytes()))
                    {
                        // The parser let no CR, LF or NUL into a value (RFC 9110 §5.5).
                        status_fields.extend_from_slice(n.as_bytes());
                        status_fields.extend_from_slice(b": ");
                        status_fields.extend_from_slice(resp.bytes(h.value));
                        status_fields.extend_from_slice(b"\r\n");
                    }
                    if name.eq_ignore_ascii_case(b"content-type") {
                        let v = resp.bytes(h.value);
                        if !is_json_media_type(v) {
                            not_json_type =
                                Some(String::from_utf8_lossy(media_type(v)).to_ascii_lowercase());
                        }
                        continue;
                    }
                    if !name.eq_ignore_ascii_case(b"content-encoding") {
                        continue;
                    }
                    let v = String::from_utf8_lossy(resp.bytes(h.value)).to_ascii_lowercase();
                    for c in v.split(',').map(str::trim) {
                        if !c.is_empty() && c != "identity" {
                            if !coding.is_empty() {
                                coding.push_str(", ");
                            }
                            coding.push_str(c);
                        }
                    }
                }
                for h in resp.headers.iter().take(keep) {
                    headers.push((
                        String::from_utf8_lossy(resp.bytes(h.name)).to_ascii_lowercase(),
                        resp.bytes(h.value).to_vec(),
                    ));
                }
                let status = resp.status;
                let head_bytes = resp.raw.len() as u64;
                let reusable_head = resp.keep_alive
                    && resp.version == Version::Http11
                    && resp.body != RespBody::Close
                    && !(head_request || status == 204 || status == 304)
                    && !self.w.shutdown.is_set();
                resp.raw = Bytes::new();
                // Counted as the proxy counts a relayed answer: the upstream's status, or the
                // error that cut its body (a body over the caps is the route's limit, not the
                // upstream's failure).
                let (st, err, got) = match &read {
                    Ok(body) => (status, None, body.len() as u64),
                    Err((f, true)) => {
                        let g = if f.timeout {
                            GatewayError::UpstreamTimeout
                        } else {
                            GatewayError::UpstreamClosed
                        };
                        (g.status(), Some(g), 0)
                    }
                    Err((_, false)) => (status, None, 0),
                };
                crate::proxy::record::sub_request_done(
                    self.w,
                    &rec,
                    st,
                    err,
                    sent,
                    head_bytes.saturating_add(got),
                );
                match read {
                    Ok(body) => {
                        let reusable = reusable_head && up.rbuf.is_empty();
                        settle(self.w, group, up, ch.probe, ch.failed, reusable);
                        match self.budget.get().checked_sub(body.len()) {
                            Some(b) => self.budget.set(b),
                            None => {
                                self.over.set(true);
                                return Err(over_total());
                            }
                        }
                        Ok(Fetched {
                            status,
                            headers,
                            body,
                            coding: (!coding.is_empty()).then_some(coding),
                            not_json_type,
                            status_fields,
                        })
                    }
                    Err((f, endpoint_fault)) => {
                        settle(
                            self.w,
                            group,
                            up,
                            ch.probe,
                            ch.failed || endpoint_fault,
                            false,
                        );
                        Err(f)
                    }
                }
            }
        };
        self.w.bufs.give_resp(resp);
        result
    }

    /// The answer: the calls' values merged in declared order, or the error that ends the
    /// request.
    fn assemble(&self, mut fails: Vec<Option<Fail>>, ids: &Ids<'_>) -> Composed {
        let calls = &self.plan.calls;
        if self.over.get() {
            // Not a call's failure: which answer went over depends on arrival order.
            let body = serde_json::json!({
                "error": "compose_too_large",
                "status": 502,
                "message": format!(
                    "the calls' answers together are over max_total_bytes ({} bytes)",
                    self.plan.max_total_bytes
                ),
                "request_id": String::from_utf8_lossy(ids.request),
            "trace_id": ids.trace,
            });
            return json_answer(502, &body, Vec::new());
        }
        // A required call that failed on its own account (not through a dependency) is named
        // first; declared order breaks ties, so the answer does not depend on timing.
        let failed_required = calls
            .iter()
            .enumerate()
            .filter(|(i, c)| c.required && fails[*i].is_some())
            .min_by_key(|(i, _)| (fails[*i].as_ref().is_some_and(|f| f.inherited), *i));
        if let Some((i, _)) = failed_required {
            let f = fails[i].clone().unwrap_or_else(|| Fail::new("failed"));
            return self.call_error(i, f, ids);
        }
        // The results, moved out (every call has ended: nothing else holds them).
        let done = std::mem::take(&mut *self.done.borrow_mut());
        let mut vals: Vec<Option<Value>> = Vec::with_capacity(done.len());
        let mut raws: Vec<Option<Rc<Fetched>>> = Vec::with_capacity(done.len());
        for (i, o) in done.into_iter().enumerate() {
            let (v, raw) = match o.map(|o| Rc::try_unwrap(o).map_err(|o| o.body.clone())) {
                None => (None, None),
                Some(Ok(o)) => {
                    // HEAD and 204 answers have no bytes: their value is null.
                    let raw = o.fetched.filter(|f| !calls[i].tree && !f.body.is_empty());
                    (Some(o.body), raw)
                }
                Some(Err(body)) => (Some(body), None),
            };
            vals.push(v);
            raws.push(raw);
        }
        // Joins first, in declared order, into their sources' values.
        for (i, c) in calls.iter().enumerate() {
            let Some(fe) = c.for_each.as_ref().filter(|f| f.join.is_some()) else {
                continue;
            };
            if fails[i].is_some() {
                continue;
            }
            if let Some(Value::Array(results)) = vals[i].take() {
                if let Some(src) = vals[fe.source].as_mut() {
                    if let Err(e) = merge::join(src, fe, &results, self.plan.max_total_bytes) {
                        fails[i] = Some(Fail::new(e));
                    }
                }
            }
        }
        let mut partial: Vec<&str> = Vec::new();
        let mut errors: Vec<Value> = Vec::new();
        let mut parts: Vec<(usize, Vec<(String, Piece<'_>)>)> = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            let joined = c.for_each.as_ref().is_some_and(|f| f.join.is_some());
            let mut fail = fails[i].clone();
            let mut piece = None;
            if fail.is_none() && !joined {
                match raws[i].as_deref() {
                    // No tree: the answer's bytes, whole or split at the top level.
                    Some(f) => piece = Some(Piece::Raw(merge::trim(&f.body))),
                    None => {
                        match merge::shape(vals[i].take().unwrap_or(Value::Null), &self.shape_of(c))
                        {
                            Ok(v) => piece = Some(Piece::Tree(v)),
                            Err(e) => fail = Some(Fail::new(e)),
                        }
                    }
                }
            }
            let mut entries = Vec::new();
            if let (Some(p), None) = (piece, &fail) {
                match (&c.shape.into, p) {
                    (Some(k), p) => entries.push((k.clone(), p)),
                    (None, Piece::Tree(Value::Object(o))) => {
                        entries.extend(o.into_iter().map(|(k, v)| (k, Piece::Tree(v))))
                    }
                    (None, Piece::Raw(b)) => {
                        match merge::top_level(b) {
                            Some(top) => {
                                entries.extend(top.into_iter().map(|(k, v)| (k, Piece::Raw(v))))
                            }
                            None => fail = Some(Fail::new(
                                "its answer is not a JSON object, and the call has no `into` key",
                            )),
                        }
                    }
                    (None, _) => {
                        fail = Some(Fail::new(
                            "its answer is not a JSON object, and the call has no `into` key",
                        ))
                    }
                }
            }
            // With `errors_field`, `_errors` is the gateway's list of failed calls: an
            // answer's own member of that name would be taken for it (or silently replaced).
            if fail.is_none()
                && self.plan.errors_field
                && entries.iter().any(|(k, _)| k == ERRORS_FIELD)
            {
                entries.clear();
                fail = Some(Fail::new(
                    "its answer has a top-level member \"_errors\", the name errors_field gives the list of failed calls",
                ));
            }
            if let Some(f) = fail {
                if c.required {
                    return self.call_error(i, f, ids);
                }
                partial.push(&c.id);
                errors.push(serde_json::json!({"call": c.id, "reason": f.reason}));
                match (&c.shape.into, c.fallback.clone()) {
                    (Some(k), Some(v)) => entries.push((k.clone(), Piece::Tree(v))),
                    (None, Some(Value::Object(o))) => {
                        entries.extend(o.into_iter().map(|(k, v)| (k, Piece::Tree(v))))
                    }
                    _ => {}
                }
            }
            parts.push((i, entries));
        }
        let mut root = match merge::merge(parts, self.plan.on_conflict, self.plan.arrays) {
            Ok(r) => r,
            Err(cf) => {
                let body = serde_json::json!({
                        "error": "compose_conflict",
                        "status": 502,
                        "message": format!(
                            "calls {:?} and {:?} both give key {:?} (on_conflict = \"error\")",
                            calls[cf.first].id, calls[cf.second].id, cf.key
                        ),
                        "key": cf.key,
                        "calls": [calls[cf.first].id, calls[cf.second].id],
                        "request_id": String::from_utf8_lossy(ids.request),
                "trace_id": ids.trace,
                    });
                return json_answer(502, &body, Vec::new());
            }
        };
        if self.plan.errors_field && !errors.is_empty() {
            root.insert(ERRORS_FIELD.into(), Piece::Tree(Value::Array(errors)));
        }
        let mut headers = Vec::new();
        if !partial.is_empty() {
            headers.extend_from_slice(b"ringway-partial: ");
            headers.extend_from_slice(partial.join(",").as_bytes());
            headers.extend_from_slice(b"\r\n");
        }
        let mut body =
            Vec::with_capacity(raws.iter().flatten().map(|f| f.body.len()).sum::<usize>() + 64);
        merge::write_object(&root, &mut body);
        body.push(b'\n');
        Composed {
            status: 200,
            body,
            headers,
            kind: None,
            own_type: false,
            own_date: false,
        }
    }

    /// The shaping still to apply to a call's value at assembly.
    fn shape_of(&self, c: &Call) -> Shape {
        match &c.for_each {
            // Per-result shaping was done as each batch came in.
            Some(_) => Shape {
                wrap: c.shape.wrap.clone(),
                flatten: c.shape.flatten,
                ..Shape::default()
            },
            None => Shape {
                into: None,
                extract: c.shape.extract.clone(),
                pick: c.shape.pick.clone(),
                omit: c.shape.omit.clone(),
                rename: c.shape.rename.clone(),
                wrap: c.shape.wrap.clone(),
                flatten: c.shape.flatten,
            },
        }
    }

    /// The answer when required call `i` failed: 504 for a timeout, its own status when it
    /// answered and the route passes statuses on, else 502.
    fn call_error(&self, i: usize, f: Fail, ids: &Ids<'_>) -> Composed {
        let (status, passed) = match f.status {
            _ if f.timeout => (504, false),
            Some(s) if self.plan.pass_status && (400..=599).contains(&s) => (s, true),
            _ => (502, false),
        };
        let id = &self.plan.calls[i].id;
        let body = serde_json::json!({
            "error": if f.timeout { "compose_call_timeout" } else { "compose_call_failed" },
            "status": status,
            "call": id,
            "message": format!("call {id:?} failed: {}", f.reason),
            "request_id": String::from_utf8_lossy(ids.request),
            "trace_id": ids.trace,
        });
        let headers = if passed { f.status_fields } else { Vec::new() };
        json_answer(status, &body, headers)
    }
}

/// The request's ids, named in the JSON of a failed composition as in every gateway-made error.
struct Ids<'a> {
    request: &'a [u8],
    /// The W3C trace id, 32 hex digits.
    trace: &'a str,
}

fn json_answer(status: u16, v: &Value, headers: Vec<u8>) -> Composed {
    let mut body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let kind = v.get("error").and_then(Value::as_str).and_then(|e| {
        crate::metrics::ERROR_KINDS
            .iter()
            .find(|k| **k == e)
            .copied()
    });
    Composed {
        status,
        body,
        headers,
        kind,
        own_type: false,
        own_date: false,
    }
}

fn over_total() -> Fail {
    Fail::new("the request's calls answered more than max_total_bytes")
}

fn timeout_fail() -> Fail {
    Fail {
        timeout: true,
        ..Fail::new("it did not answer in time")
    }
}

/// A call's answer as JSON: a 2xx with a JSON body (none for HEAD and 204). The rules are
/// the same whether the call parses the answer into a tree (something refers into it, shapes
/// or deep-merges it) or passes it on as sent, so that a hostile answer cannot pass in one
/// mode where it fails in the other: a 2xx status; no content coding (calls ask for
/// `identity`); a JSON media type, or none (RFC 9110 §8.3: the body is then examined);
/// at most `max_call_bytes` (`read_body`); JSON text that [`check_json`] accepts.
fn to_out(call: &Call, f: &Rc<Fetched>) -> Result<CallOut, Fail> {
    if !(200..300).contains(&f.status) {
        return Err(Fail {
            status: Some(f.status),
            status_fields: f.status_fields.clone(),
            ..Fail::new(format!("the upstream answered {}", f.status))
        });
    }
    let body = if &*call.method == "HEAD" || f.status == 204 {
        Value::Null
    } else if let Some(c) = &f.coding {
        // Calls send `accept-encoding: identity`; an upstream that encodes all the same
        // (RFC 9110 §12.5.3) sends bytes that are not JSON text until decoded.
        return Err(Fail::new(format!("content-coding {c} not supported")));
    } else if let Some(t) = &f.not_json_type {
        return Err(Fail::new(format!(
            "its answer is not JSON (content-type {t})"
        )));
    } else {
        check_json(&f.body, call.max_depth)
            .map_err(|e| Fail::new(format!("its answer is not JSON ({e})")))?;
        if call.tree {
            // Cannot fail where `check_json` passed (the same parser, the same limits); the
            // error is kept rather than assumed away.
            serde_json::from_slice::<Value>(&f.body)
                .map_err(|e| Fail::new(format!("its answer is not JSON ({e})")))?
        } else {
            Value::Null
        }
    };
    Ok(CallOut {
        status: f.status,
        fetched: Some(f.clone()),
        body,
    })
}

/// `application/json`, or a `+json` structured syntax suffix (RFC 6839 §3.1), parameters
/// aside, compared without case.
fn is_json_media_type(v: &[u8]) -> bool {
    let t = media_type(v);
    t.eq_ignore_ascii_case(b"application/json")
        || (t.len() > b"application/+json".len()
            && t[..b"application/".len()].eq_ignore_ascii_case(b"application/")
            && t[t.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// A Content-Type value's type/subtype: before any parameter, without surrounding spaces.
fn media_type(v: &[u8]) -> &[u8] {
    let t = v.split(|b| *b == b';').next().unwrap_or(b"");
    t.trim_ascii()
}

/// Checks that `b` is JSON text an answer may hold, by the rules of the tree the shaped mode
/// builds, without building it: UTF-8 (RFC 8259 §8.1); string escapes that make characters,
/// not lone surrogates (§8.2); numbers a double holds (§6: serde_json refuses the rest);
/// nesting within serde_json's limit ([`MAX_JSON_DEPTH`]); and member names unique within
/// each object (§4: with duplicates, one parser takes the first and another the last, so an
/// answer written as sent could mean one thing to the gateway and another to the client).
fn check_json(b: &[u8], max_depth: usize) -> Result<(), String> {
    // A first pass with a message that names the limit, and before serde_json's own
    // recursion is spent on a deep document.
    if nested_deeper(b, max_depth) {
        return Err(if max_depth < MAX_JSON_DEPTH {
            format!(
                "nested more than {max_depth} levels: where the call puts it, the composed answer would nest more than {MAX_JSON_DEPTH}"
            )
        } else {
            format!("nested more than {max_depth} levels")
        });
    }
    std::str::from_utf8(b).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_slice::<Checked>(b)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A JSON value read in full (strings decoded, numbers converted) and dropped as it goes.
/// Unlike `serde::de::IgnoredAny`, which skips strings and numbers without judging them.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Checked, A::Error> {
        while a.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Checked, A::Error> {
        // Sorted once at the end: a hostile object of many members costs n log n, not n².
        let mut names: Vec<Cow<'de, str>> = Vec::new();
        while let Some(Name(k)) = a.next_key::<Name<'de>>()? {
            names.push(k);
            a.next_value::<Checked>()?;
        }
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(serde::de::Error::custom(format_args!(
                "member name {:?} appears twice in an object",
                w[0]
            )));
        }
        Ok(Checked)
    }
}

/// A member name: borrowed from the answer unless it holds an escape.
struct Name<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Name<'de>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Whether valid JSON text `b` nests arrays and objects deeper than `max`: one pass, the
/// brackets inside strings skipped.
fn nested_deeper(b: &[u8], max: usize) -> bool {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &c in b {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Reads a response body in full, at most `cap` bytes (decoded), by `deadline`. An error says
/// whether the endpoint is to blame (a body over the caps is the route's limit, not a fault of
/// the endpoint's, and does not count towards its breaker or ejection).
async fn read_body(
    up: &mut UpConn,
    resp: &ResponseHead,
    head_request: bool,
    cap: usize,
    deadline: Instant,
    pause: Duration,
) -> Result<Vec<u8>, (Fail, bool)> {
    let too_large = || {
        let f = Fail::new(format!(
            "its answer is larger than {cap} bytes (max_call_bytes)"
        ));
        (f, false)
    };
    let read = |e: IoFail| {
        let f = match e {
            IoFail::Timeout => timeout_fail(),
            IoFail::Eof => {
                Fail::new("the upstream closed the connection before the end of its answer")
            }
            IoFail::Io => Fail::new("reading the upstream's answer failed"),
            IoFail::Tls(_) => {
                Fail::new("the upstream's TLS layer failed (an alert, or a record refused)")
            }
        };
        (f, true)
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .min(pause)
    };
    if head_request {
        return Ok(Vec::new());
    }
    match resp.body {
        RespBody::None => Ok(Vec::new()),
        RespBody::Length(n) => {
            // Refused before any of it is read when the length alone is too much.
            let n = usize::try_from(n)
                .ok()
                .filter(|n| *n <= cap)
                .ok_or_else(too_large)?;
            while up.rbuf.len() < n {
                let want = (n - up.rbuf.len()).min(UPSTREAM_READ_BUF);
                let mut rb = std::mem::take(&mut up.rbuf);
                let r = read_some(&mut up.stream, &mut rb, want, left()).await;
                up.rbuf = rb;
                r.map_err(read)?;
            }
            Ok(up.rbuf.split_to(n).to_vec())
        }
        RespBody::Chunked => {
            let mut scanner = ChunkedScanner::new();
            let mut out = Vec::new();
            loop {
                if !up.rbuf.is_empty() {
                    let mut over = false;
                    let rb = &up.rbuf;
                    let r = scanner
                        .scan(rb, |a, b| {
                            if out.len() + (b - a) <= cap {
                                out.extend_from_slice(&rb[a..b]);
                            } else {
                                over = true;
                            }
                        })
                        .map_err(|e| {
                            (
                                Fail::new(format!("bad chunked framing: {}", e.reason())),
                                true,
                            )
                        })?;
                    if over {
                        return Err(too_large());
                    }
                    up.rbuf.advance(r.consumed);
                    if r.done {
                        return Ok(out);
                    }
                }
                let mut rb = std::mem::take(&mut up.rbuf);
                let r = read_some(&mut up.stream, &mut rb, UPSTREAM_READ_BUF, left()).await;
                up.rbuf = rb;
                r.map_err(read)?;
            }
        }
        RespBody::Close => {
            let mut out = Vec::new();
            loop {
                if out.len() + up.rbuf.len() > cap {
                    return Err(too_large());
                }
                out.extend_from_slice(&up.rbuf);
                up.rbuf.clear();
                let mut rb = std::mem::take(&mut up.rbuf);
                let r = read_some(&mut up.stream, &mut rb, UPSTREAM_READ_BUF, left()).await;
                up.rbuf = rb;
                match r {
                    Ok(_) => {}
                    Err(IoFail::Eof) => return Ok(out),
                    Err(e) => return Err(read(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_depth_scan_agrees_with_serde_json_and_skips_strings() {
        for (depth, open, close) in [(127, "[", "]"), (128, "[", "]"), (128, "{\"a\":", "}")] {
            let doc = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let parsed = serde_json::from_str::<Value>(&doc).is_ok();
            assert_eq!(
                !nested_deeper(doc.as_bytes(), MAX_JSON_DEPTH),
                parsed,
                "{depth}{open}"
            );
        }
        let quoted = format!(r#"["{}\"{}"]"#, "[".repeat(500), "{".repeat(500));
        assert!(!nested_deeper(quoted.as_bytes(), MAX_JSON_DEPTH));
        assert!(nested_deeper(b"[[[1]]]", 2));
        assert!(!nested_deeper(b"[[1],[2]]", 2));
    }
}
