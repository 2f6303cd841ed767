//! The cache's endpoints on the admin API (mounted by `crate::server`):
//! - `POST /cache/purge` with exactly one of `url=HOST/PATH?QUERY` (one URL, every variant),
//!   `prefix=HOST/PATH` (every URL starting with it), `tag=KEY` (a `Surrogate-Key` tag) or
//!   `all=1`, and optionally `soft=1` (mark stale instead of removing). It reaches every worker
//!   and, with `[cache.redis]`, the shared layer and the other hosts.
//! - `GET /cache`: the counters of every worker, and their sums.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{CacheStats, Purge, PurgeTarget};
use crate::admin::{AdminRequest, AdminResponse, Handler};
use crate::control::Control;

/// How long a purge or a stats call waits for the workers.
const WORKER_ANSWER_LIMIT: Duration = Duration::from_secs(2);

/// Longest purge target accepted (a URL prefix or a tag).
const MAX_TARGET: usize = 8 * 1024;

/// The purges asked for by the query (two for a URL or prefix without a scheme whose port
/// is one scheme's default, see [`super::purge_urls`]; else one), or the reason it is
/// refused.
fn purge_of(req: &AdminRequest) -> Result<Vec<Purge>, String> {
    let mut targets = Vec::new();
    for name in ["url", "prefix", "tag", "all"] {
        if let Some(v) = req.query_param(name)? {
            targets.push((name, v));
        }
    }
    let (name, value) = match targets.len() {
        1 => targets.remove(0),
        0 => return Err("say what to purge: url=, prefix=, tag= or all=1".into()),
        _ => return Err("give exactly one of url=, prefix=, tag= and all=1".into()),
    };
    if value.is_empty() || value.len() > MAX_TARGET {
        return Err(format!("{name}: expected 1 to {MAX_TARGET} bytes"));
    }
    let host_path = |v: &str| -> Result<Vec<Vec<u8>>, String> {
        // The store's form: the lower-cased host, then the path (and query).
        // The scheme, when given, says which port is the default one; without one, a port
        // that is either scheme's default names both origins it may be.
        let (v, https) = match (v.strip_prefix("http://"), v.strip_prefix("https://")) {
            (Some(v), _) => (v, Some(false)),
            (_, Some(v)) => (v, Some(true)),
            _ => (v, None),
        };
        let (host, path) = v.split_at(v.find('/').unwrap_or(v.len()));
        if host.is_empty() {
            return Err(format!("{name}: expected HOST/PATH, got {v:?}"));
        }
        let path = if path.is_empty() { "/" } else { path };
        Ok(match https {
            Some(_) => vec![super::purge_url_in(https, host, path)],
            None => super::purge_urls(host, path),
        })
    };
    // With the same path without a host: the form a `key.ignore_host` route's objects are
    // stored under, which answer that host too (`super::keyed_url`).
    let with_hostless = |urls: Vec<Vec<u8>>| -> Vec<Vec<u8>> {
        let bare = urls.first().map(|u| super::hostless(u).to_vec());
        urls.into_iter().chain(bare).collect()
    };
    let targets = match name {
        "url" => with_hostless(host_path(&value)?)
            .into_iter()
            .map(PurgeTarget::Url)
            .collect(),
        "prefix" => with_hostless(host_path(&value)?)
            .into_iter()
            .map(PurgeTarget::Prefix)
            .collect(),
        "tag" => vec![PurgeTarget::Tag(value.into_bytes())],
        _ if value == "1" || value == "true" => vec![PurgeTarget::All],
        _ => return Err("all: expected all=1".into()),
    };
    let soft = match req.query_param("soft")?.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(v) => return Err(format!("soft: expected 1 or 0, got {v:?}")),
    };
    Ok(targets
        .into_iter()
        .map(|target| Purge { target, soft })
        .collect())
}

/// `POST /cache/purge`.
pub fn purge_handler(control: Arc<Control>) -> Handler {
    Arc::new(move |req| {
        let purges = match purge_of(req) {
            Ok(p) => p,
            Err(why) => return AdminResponse::error(400, &why),
        };
        let soft = purges.iter().any(|p| p.soft);
        // Each purge on every worker in turn; what each hit is summed per worker.
        let mut per_worker: Vec<u64> = Vec::new();
        let mut failed = None;
        for p in purges {
            match super::purge(&control, p, WORKER_ANSWER_LIMIT) {
                Ok(hit) => {
                    per_worker.resize(per_worker.len().max(hit.len()), 0);
                    for (acc, n) in per_worker.iter_mut().zip(hit) {
                        *acc = acc.saturating_add(n);
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed.map_or(Ok(per_worker), Err) {
            Ok(per_worker) => AdminResponse::json(
                200,
                &json!({
                    "purged": per_worker.iter().sum::<u64>(),
                    "soft": soft,
                    "per_worker": per_worker,
                }),
            ),
            Err(e) => AdminResponse::error(503, &e.to_string()),
        }
    })
}

/// Each counter of a worker's cache: its name (the admin API's `GET /cache` key; with
/// `ringway_cache_` before it, the Prometheus family), kind and meaning, and value.
type Fields = [(&'static str, &'static str, &'static str, u64); 10];

fn fields(s: &CacheStats) -> Fields {
    [
        (
            "hits",
            "counter",
            "Answers from the store while fresh.",
            s.hits,
        ),
        (
            "stale_hits",
            "counter",
            "Stale answers from the store (stale-while-revalidate, stale-if-error).",
            s.stale_hits,
        ),
        (
            "misses",
            "counter",
            "Requests on cached routes that went to the upstream.",
            s.misses,
        ),
        ("stores", "counter", "Responses stored.", s.stores),
        (
            "revalidations",
            "counter",
            "Conditional requests sent to refresh a stored response.",
            s.revalidations,
        ),
        (
            "coalesced",
            "counter",
            "Misses that waited for another request's fetch of the same key.",
            s.coalesced,
        ),
        (
            "purged",
            "counter",
            "Objects removed or marked stale by purges.",
            s.purged,
        ),
        (
            "purge_scanned",
            "counter",
            "Stored objects read by purges that read the whole store and by sweeps of invalidated URLs.",
            s.purge_scanned,
        ),
        ("entries", "gauge", "Objects in the stores.", s.entries),
        (
            "bytes",
            "gauge",
            "Bytes weighed by the stores (headers and bodies).",
            s.bytes,
        ),
    ]
}

/// The workers' counters summed, field by field.
fn total(per_worker: &[CacheStats]) -> Fields {
    let mut t = fields(&CacheStats::default());
    for s in per_worker {
        for (acc, (_, _, _, v)) in t.iter_mut().zip(fields(s)) {
            acc.3 = acc.3.saturating_add(v);
        }
    }
    t
}

fn stats_json(f: &Fields) -> serde_json::Value {
    serde_json::Value::Object(
        f.iter()
            .map(|(k, _, _, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

/// The cache's families in the Prometheus text format, summed over the workers (appended to
/// `/metrics`).
pub fn write_prometheus(per_worker: &[CacheStats], out: &mut String) {
    use std::fmt::Write as _;
    for (name, kind, help, v) in total(per_worker) {
        let name = if kind == "counter" {
            format!("ringway_cache_{name}_total")
        } else {
            format!("ringway_cache_{name}")
        };
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
}

/// `GET /metrics`: the gateway's metrics and the cache's, in the Prometheus text format, or
/// in OpenMetrics text when the scraper's `Accept` prefers it.
pub fn metrics_handler(control: Arc<Control>) -> Handler {
    Arc::new(move |req| {
        let mut out = String::new();
        if let Err(e) = crate::metrics::render_prometheus(&control, &mut out) {
            return AdminResponse::error(503, &e.to_string());
        }
        match super::stats(&control, WORKER_ANSWER_LIMIT) {
            Ok(per_worker) => write_prometheus(&per_worker, &mut out),
            Err(e) => return AdminResponse::error(503, &e.to_string()),
        }
        if req
            .header("accept")
            .is_some_and(crate::metrics::prom::wants_openmetrics)
        {
            let om = crate::metrics::prom::to_openmetrics(&out);
            return AdminResponse::text(200, crate::metrics::prom::OPENMETRICS_CONTENT_TYPE, om);
        }
        AdminResponse::text(200, crate::metrics::prom::CONTENT_TYPE, out)
    })
}

/// `GET /cache`.
pub fn stats_handler(control: Arc<Control>) -> Handler {
    Arc::new(
        move |_req| match super::stats(&control, WORKER_ANSWER_LIMIT) {
            Ok(per_worker) => AdminResponse::json(
                200,
                &json!({
                    "total": stats_json(&total(&per_worker)),
                    "per_worker": per_worker.iter().map(|s| stats_json(&fields(s))).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => AdminResponse::error(503, &e.to_string()),
        },
    )
}
