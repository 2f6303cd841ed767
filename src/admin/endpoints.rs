//! The built-in admin endpoints.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{view, Admin, AdminRequest, AdminResponse, Handler, Method};
use crate::log::Level;
use crate::proxy::Worker;
use crate::upstream::health::HealthHub;

/// How long `/upstreams` waits for the workers' answers (they run control jobs within one
/// 50 ms sync interval; a worker slower than this is named in a 503).
pub const ASK_LIMIT: Duration = Duration::from_secs(2);

/// A handler holding the admin weakly: the admin owns its routes, so a strong reference here
/// would keep it alive forever.
fn with_admin(
    admin: &Arc<Admin>,
    f: impl Fn(&Admin, &AdminRequest) -> AdminResponse + Send + Sync + 'static,
) -> Handler {
    let weak: Weak<Admin> = Arc::downgrade(admin);
    Arc::new(move |req| match weak.upgrade() {
        Some(a) => f(&a, req),
        None => AdminResponse::error(503, "the gateway is stopping"),
    })
}

pub(super) fn mount_builtin(admin: &Arc<Admin>) {
    admin.mount_open(
        Method::Get,
        "/live",
        Arc::new(|_| AdminResponse::json(200, &json!({ "live": true }))),
    );
    admin.mount_open(Method::Get, "/ready", with_admin(admin, ready));
    admin.mount(Method::Get, "/config", with_admin(admin, config));
    admin.mount(Method::Get, "/routes", with_admin(admin, routes));
    admin.mount(Method::Get, "/upstreams", with_admin(admin, upstreams));
    admin.mount(Method::Post, "/drain", with_admin(admin, drain));
    admin.mount(Method::Get, "/log/level", Arc::new(|_| log_level()));
    admin.mount(Method::Put, "/log/level", Arc::new(set_log_level));
}

fn ready(a: &Admin, _: &AdminRequest) -> AdminResponse {
    let (draining, closes_in, stopped) = a.drain_state();
    let shutting_down = a.gateway_stop.load(std::sync::atomic::Ordering::SeqCst);
    let ready = a.is_ready();
    let body = json!({
        "ready": ready,
        "draining": draining,
        "shutting_down": shutting_down,
        "listeners_close_in_ms": closes_in.map(|d| d.as_millis() as u64),
        "workers": a.control.workers(),
        "workers_stopped_accepting": stopped,
    });
    AdminResponse::json(if ready { 200 } else { 503 }, &body)
}

fn config(a: &Admin, _: &AdminRequest) -> AdminResponse {
    AdminResponse::json(200, &view::config(&a.config()))
}

fn routes(a: &Admin, _: &AdminRequest) -> AdminResponse {
    AdminResponse::json(200, &json!({ "routes": view::routes(&a.config()) }))
}

fn drain(a: &Admin, req: &AdminRequest) -> AdminResponse {
    let delay = match req.query_param("delay") {
        Err(why) => return AdminResponse::error(400, &why),
        Ok(None) => a.drain_delay,
        Ok(Some(s)) if s.trim_start_matches('0') == "s" || s.trim_start_matches('0') == "ms" => {
            Duration::ZERO
        }
        Ok(Some(s)) => match crate::config::parse_duration(&s) {
            Ok(d) if d <= super::config::MAX_DRAIN_DELAY => d,
            Ok(_) => return AdminResponse::error(400, "delay: at most 1h"),
            Err(e) => return AdminResponse::error(400, &format!("delay: {e}")),
        },
    };
    let close_at = a.drain(delay);
    AdminResponse::json(
        202,
        &json!({
            "ready": false,
            "draining": true,
            "listeners_close_in_ms":
                close_at.saturating_duration_since(Instant::now()).as_millis() as u64,
        }),
    )
}

fn level_name(l: Option<Level>) -> &'static str {
    match l {
        None => "off",
        Some(Level::Error) => "error",
        Some(Level::Warn) => "warn",
        Some(Level::Info) => "info",
        Some(Level::Debug) => "debug",
    }
}

fn log_level() -> AdminResponse {
    AdminResponse::json(200, &json!({ "level": level_name(crate::log::level()) }))
}

/// `PUT /log/level` with `{"level": "debug"}` or the bare name as the body.
fn set_log_level(req: &AdminRequest) -> AdminResponse {
    let text = String::from_utf8_lossy(&req.body);
    let name = if text.trim_start().starts_with('{') {
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => v
                .get("level")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            Err(e) => return AdminResponse::error(400, &format!("body is not JSON: {e}")),
        }
    } else {
        text.trim().to_string()
    };
    let level =
        match name.as_str() {
            "off" => None,
            "error" => Some(Level::Error),
            "warn" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => return AdminResponse::error(
                400,
                "level must be one of off, error, warn, info, debug (as {\"level\": \"...\"} or \
                 the bare name)",
            ),
        };
    let before = crate::log::level();
    crate::log::set_level(level);
    crate::warn!(
        "admin: log level {} -> {} (from {})",
        level_name(before),
        level_name(level),
        req.peer
    );
    AdminResponse::json(
        200,
        &json!({ "level": level_name(level), "previous": level_name(before) }),
    )
}

/// One endpoint as one worker sees it.
struct EpView {
    addr: SocketAddr,
    authority: String,
    weight: u32,
    routable: bool,
    in_flight: u32,
    idle: usize,
    failures: u32,
}

struct GroupView {
    index: usize,
    name: String,
    open_connections: u32,
    /// (state, in flight, pending)
    breaker: Option<(&'static str, u32, u32)>,
    endpoints: Vec<EpView>,
}

struct WorkerView {
    hub: Arc<HealthHub>,
    groups: Vec<GroupView>,
}

/// Runs on each worker's thread, between requests (a control job).
fn worker_view(w: &Rc<Worker>) -> WorkerView {
    let snap = w.config();
    WorkerView {
        hub: w.hub.clone(),
        groups: snap
            .upstreams
            .iter()
            .map(|g| GroupView {
                index: g.index,
                name: g.name.clone(),
                open_connections: g.conns.open.get(),
                breaker: g
                    .breaker
                    .as_ref()
                    .map(|b| (b.state_name(), b.in_flight.get(), b.pending.get())),
                endpoints: g
                    .endpoints
                    .iter()
                    .zip(&g.stats)
                    .map(|(e, st)| EpView {
                        addr: e.addr,
                        authority: String::from_utf8_lossy(&e.authority).into_owned(),
                        weight: e.weight,
                        routable: st.routable.get(),
                        in_flight: st.outstanding.get(),
                        idle: e.idle_len(),
                        failures: st.failures.get(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Every group and endpoint: configured weight, shared health and ejection, and per worker
/// what is in flight and pooled, summed.
fn upstreams(a: &Admin, _: &AdminRequest) -> AdminResponse {
    let views = match a.control.ask(ASK_LIMIT, worker_view) {
        Ok(v) => v,
        Err(e) => return AdminResponse::error(503, &e.to_string()),
    };
    let Some(first) = views.first() else {
        return AdminResponse::json(200, &json!({ "workers": 0, "upstreams": [] }));
    };
    let cfg = a.config();
    let now = Instant::now();
    let mut groups = Vec::new();
    for (gi, g) in first.groups.iter().enumerate() {
        let checked = cfg
            .upstreams
            .get(&g.name)
            .is_some_and(|u| u.health_check.is_some());
        let mut endpoints = Vec::new();
        for (ei, e) in g.endpoints.iter().enumerate() {
            let per_worker: Vec<&EpView> = views
                .iter()
                .filter_map(|v| v.groups.get(gi)?.endpoints.get(ei))
                .collect();
            let health = first.hub.endpoint(g.index, ei, now);
            let ejected_for = health.and_then(|h| h.ejected_for);
            let healthy = health.is_none_or(|h| h.active_ok);
            endpoints.push(json!({
                "address": e.authority,
                "resolved": e.addr.to_string(),
                "weight": e.weight,
                "health": if healthy { "healthy" } else { "unhealthy" },
                "health_checked": checked,
                "ejected": ejected_for.is_some(),
                "ejected_for_ms": ejected_for.map(|d| d.as_millis() as u64),
                "ejections": health.map_or(0, |h| h.ejections),
                "routable": healthy && ejected_for.is_none(),
                "in_flight": per_worker.iter().map(|p| u64::from(p.in_flight)).sum::<u64>(),
                "idle_pool": per_worker.iter().map(|p| p.idle as u64).sum::<u64>(),
                "per_worker": per_worker.iter().enumerate().map(|(w, p)| json!({
                    "worker": w,
                    "routable": p.routable,
                    "in_flight": p.in_flight,
                    "idle_pool": p.idle,
                    "consecutive_failures": p.failures,
                })).collect::<Vec<_>>(),
            }));
        }
        let per_group: Vec<&GroupView> = views.iter().filter_map(|v| v.groups.get(gi)).collect();
        groups.push(json!({
            "name": g.name,
            "balance": cfg.upstreams.get(&g.name).map(|u| view::balance(u.balance)),
            "open_connections": per_group.iter().map(|p| u64::from(p.open_connections)).sum::<u64>(),
            "breaker": g.breaker.map(|_| per_group.iter().enumerate().map(|(w, p)| {
                let (state, in_flight, pending) = p.breaker.unwrap_or(("closed", 0, 0));
                json!({ "worker": w, "state": state, "in_flight": in_flight, "pending": pending })
            }).collect::<Vec<_>>()),
            "endpoints": endpoints,
        }));
    }
    AdminResponse::json(200, &json!({ "workers": views.len(), "upstreams": groups }))
}
