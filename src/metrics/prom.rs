//! The Prometheus text exposition format, version 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>), written by hand.
//!
//! Why not a crate: `prometheus-client` and `prometheus` keep their own registries of metric
//! types built on atomics, and encode from those. Ringway's counters are plain per-worker
//! cells summed at scrape time through the control plane; using a crate only for the encoder
//! would mean building its registry and copying every value into it on each scrape, to write
//! a format that is four rules: `# HELP`/`# TYPE` lines, `name{labels} value` samples, label
//! values escaped (`\\`, `\"`, `\n`), and cumulative histogram buckets with `_sum`/`_count`.
//! [`check_exposition`] checks those rules (and is what the tests parse with).
//!
//! OpenMetrics 1.0 text (<https://github.com/prometheus/OpenMetrics/blob/main/specification/OpenMetrics.md>)
//! is served to a scraper whose `Accept` prefers it ([`wants_openmetrics`]): the same lines,
//! rewritten by [`to_openmetrics`], as it differs only in its content type, the `# EOF`
//! terminator, counter families named without their samples' `_total` suffix, and `"` escaped
//! in HELP text. Cheap: one pass over the text already made, on the scrape's thread.

use std::fmt::Write as _;
use std::time::Duration;

use crate::control::{Control, ControlError};

use super::{
    HistSample, TrafficSample, WorkerSample, AUTH_KINDS, BUCKETS_LE, ERROR_KINDS, RATE_LIMIT_KINDS,
    STATUS_CLASSES,
};

/// The content type of what [`render_prometheus`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of OpenMetrics text ([`to_openmetrics`]).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Most media ranges of an `Accept` header looked at (the admin API bounds the header too).
const MAX_ACCEPT_RANGES: usize = 32;

/// Whether an `Accept` value asks for OpenMetrics 1.0.0 (`application/openmetrics-text`,
/// without a version or with `version=1.0.0`) with a weight above 0 and not below that of the
/// text format (`text/plain`, `text/*`, `*/*`): RFC 9110 §12.5.1. Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
pub fn wants_openmetrics(accept: &[u8]) -> bool {
    let Ok(accept) = std::str::from_utf8(accept) else {
        return false;
    };
    let (mut om, mut text) = (0.0f64, 0.0f64);
    for range in accept.split(',').take(MAX_ACCEPT_RANGES) {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut version) = (1.0f64, None);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                // A weight that is not a number between 0 and 1 drops the range.
                "q" => {
                    q = v
                        .parse()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))
                        .unwrap_or(-1.0)
                }
                "version" => version = Some(v.to_string()),
                _ => {}
            }
        }
        match media.as_str() {
            "application/openmetrics-text" if version.as_deref().is_none_or(|v| v == "1.0.0") => {
                om = om.max(q)
            }
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= text
}

/// Rewrites a Prometheus text exposition (as [`render_prometheus`] and the cache write it) as
/// OpenMetrics 1.0 text: a counter family `x_total` is declared as `x` (its samples keep the
/// suffix; a counter sample without one gets it), `"` in HELP text is escaped, `untyped`
/// reads `unknown`, blank lines go, and `# EOF` ends it.
pub fn to_openmetrics(text: &str) -> String {
    use std::collections::HashSet;
    // Counter families, by their name in the text format.
    let counters: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let family = |name: &'_ str| -> String {
        if counters.contains(name) {
            name.strip_suffix("_total").unwrap_or(name).to_string()
        } else {
            name.to_string()
        }
    };
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str("# HELP ");
            out.push_str(&family(name));
            out.push(' ');
            // The text format escapes `\` and line feeds in HELP; OpenMetrics `"` too.
            out.push_str(&help.replace('"', "\\\""));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str("# TYPE ");
            out.push_str(&family(name));
            out.push(' ');
            out.push_str(if kind == "untyped" { "unknown" } else { kind });
        } else if line.is_empty() {
            continue;
        } else if line.starts_with('#') {
            out.push_str(line);
        } else {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            out.push_str(name);
            if counters.contains(name) && !name.ends_with("_total") {
                out.push_str("_total");
            }
            out.push_str(&line[end..]);
        }
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// How long a scrape waits for the workers (each answers within one 50 ms sync interval).
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(2);

/// Gathers a sample from every worker (through `ctl.ask`) and writes their sum to `out` in the
/// Prometheus text format ([`CONTENT_TYPE`]). Called off the request path (the admin listener's
/// `/metrics`); it allocates freely.
pub fn render_prometheus(ctl: &Control, out: &mut String) -> Result<(), ControlError> {
    let samples = ctl.ask(SCRAPE_DEADLINE, |w| w.metrics.sample(w))?;
    let mut s = WorkerSample::merge(samples);
    s.access_log_write_lost = crate::access_log::lines_lost_to_write_errors();
    write_sample(&s, out);
    Ok(())
}

/// Escapes a label value (`\`, `"` and line feed).
pub fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

struct Expo<'a> {
    out: &'a mut String,
}

impl Expo<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // HELP text escapes `\` and line feed; these are our own constants, checked in tests.
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label(v, self.out);
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        self.out.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.out, " {v}");
    }

    fn sample_f(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.out, " {v}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistSample) {
        let mut l: Vec<(&str, &str)> = labels.to_vec();
        l.push(("le", ""));
        let bucket = format!("{name}_bucket");
        let mut cum = 0u64;
        for (i, c) in h.counts.iter().enumerate() {
            cum = cum.wrapping_add(*c);
            let le = BUCKETS_LE.get(i).copied().unwrap_or("+Inf");
            if let Some(last) = l.last_mut() {
                last.1 = le;
            }
            self.sample(&bucket, &l, cum);
        }
        self.sample_f(&format!("{name}_sum"), labels, h.sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), labels, cum);
    }
}

/// A counter family of a sample type: name suffix, help, value.
type Getter<T> = (&'static str, &'static str, fn(&T) -> u64);
/// A family of a sample type: name, type, help, value.
type Family<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// Families of per-route or per-upstream traffic; `prefix` is `ringway_route` or
/// `ringway_upstream`, `label` its label name.
fn traffic(
    e: &mut Expo<'_>,
    prefix: &str,
    label: &str,
    what: &str,
    all: &[(String, TrafficSample)],
) {
    let n = |s: &str| format!("{prefix}_{s}");
    e.family(
        &n("requests_total"),
        "counter",
        &format!("Requests by {what} and status class (none: no response was written)."),
    );
    for (name, t) in all {
        for (i, class) in STATUS_CLASSES.iter().enumerate() {
            e.sample(
                &n("requests_total"),
                &[(label, name), ("class", class)],
                t.status[i],
            );
        }
    }
    e.family(
        &n("errors_total"),
        "counter",
        &format!("Gateway-made error answers by {what} and error kind (kinds seen only)."),
    );
    for (name, t) in all {
        for (i, kind) in ERROR_KINDS.iter().enumerate() {
            if t.errors[i] > 0 {
                e.sample(
                    &n("errors_total"),
                    &[(label, name), ("kind", kind)],
                    t.errors[i],
                );
            }
        }
    }
    let hists = [
        ("request_duration_seconds", "Total request latency, from the first byte of the request to the end of the response"),
        ("upstream_duration_seconds", "Upstream latency: first attempt to the final response head (connects and retries included)"),
        ("gateway_duration_seconds", "Latency the gateway added: total less upstream"),
    ];
    for (i, (suffix, help)) in hists.iter().enumerate() {
        e.family(&n(suffix), "histogram", &format!("{help}, by {what}."));
        for (name, t) in all {
            e.histogram(&n(suffix), &[(label, name)], &t.latency[i]);
        }
    }
    let counters: [Getter<TrafficSample>; 4] = [
        (
            "received_bytes_total",
            "Bytes received from clients (heads and bodies)",
            |t| t.bytes_in,
        ),
        (
            "sent_bytes_total",
            "Bytes sent to clients (heads and bodies)",
            |t| t.bytes_out,
        ),
        ("retries_total", "Upstream retries", |t| t.retries),
        (
            "retry_budget_refusals_total",
            "Retries the retry budget refused",
            |t| t.retry_budget_refusals,
        ),
    ];
    for (suffix, help, get) in counters {
        e.family(&n(suffix), "counter", &format!("{help}, by {what}."));
        for (name, t) in all {
            e.sample(&n(suffix), &[(label, name)], get(t));
        }
    }
}

/// Writes a (merged) sample in the text format.
pub fn write_sample(s: &WorkerSample, out: &mut String) {
    let mut e = Expo { out };
    e.family(
        "ringway_workers",
        "gauge",
        "Workers that answered this scrape.",
    );
    e.sample("ringway_workers", &[], s.workers);
    e.family(
        "ringway_metrics_enabled",
        "gauge",
        "1 when per-request metrics are counted ([metrics] enabled).",
    );
    e.sample("ringway_metrics_enabled", &[], s.enabled as u64);

    traffic(&mut e, "ringway_route", "route", "route", &s.routes);
    e.family(
        "ringway_route_rate_limit_refusals_total",
        "counter",
        "Requests refused by a rate limit, a concurrency limit or an unreachable limit store, by route.",
    );
    for (name, t) in &s.routes {
        let v = RATE_LIMIT_KINDS.iter().map(|k| t.error(k)).sum();
        e.sample(
            "ringway_route_rate_limit_refusals_total",
            &[("route", name)],
            v,
        );
    }
    e.family(
        "ringway_route_auth_refusals_total",
        "counter",
        "Requests refused by authentication or authorization, by route and reason.",
    );
    for (name, t) in &s.routes {
        for k in AUTH_KINDS {
            e.sample(
                "ringway_route_auth_refusals_total",
                &[("route", name), ("reason", k)],
                t.error(k),
            );
        }
    }

    traffic(
        &mut e,
        "ringway_upstream",
        "upstream",
        "upstream group",
        &s.groups,
    );
    e.family(
        "ringway_upstream_connections_open",
        "gauge",
        "Open connections to the group's endpoints (pooled and in use).",
    );
    for (name, v) in &s.group_conns {
        e.sample(
            "ringway_upstream_connections_open",
            &[("upstream", name)],
            *v,
        );
    }
    e.family(
        "ringway_upstream_breaker_state",
        "gauge",
        "Workers whose circuit breaker for the group is in each state (breakers are per worker).",
    );
    for b in &s.breakers {
        for (i, st) in crate::upstream::breaker::STATE_NAMES.iter().enumerate() {
            e.sample(
                "ringway_upstream_breaker_state",
                &[("upstream", &b.group), ("state", st)],
                b.state[i],
            );
        }
    }
    e.family(
        "ringway_upstream_breaker_transitions_total",
        "counter",
        "Circuit breaker state changes, by the state entered.",
    );
    for b in &s.breakers {
        for (i, st) in crate::upstream::breaker::STATE_NAMES.iter().enumerate() {
            e.sample(
                "ringway_upstream_breaker_transitions_total",
                &[("upstream", &b.group), ("state", st)],
                b.transitions[i],
            );
        }
    }

    let eps: [Family<super::EndpointSample>; 5] = [
        (
            "ringway_endpoint_in_flight",
            "gauge",
            "Requests in flight to the endpoint.",
            |x| x.in_flight,
        ),
        (
            "ringway_endpoint_healthy",
            "gauge",
            "1 when the endpoint is routable (not ejected, passing health checks) on every worker.",
            |x| x.healthy as u64,
        ),
        (
            "ringway_endpoint_pool_idle",
            "gauge",
            "Idle keep-alive connections pooled for the endpoint.",
            |x| x.idle,
        ),
        (
            "ringway_endpoint_connect_failures_total",
            "counter",
            "New connections to the endpoint that failed (refused, timed out, TLS).",
            |x| x.connect_failures,
        ),
        (
            "ringway_endpoint_ejections_total",
            "counter",
            "Outlier-detection ejections of the endpoint.",
            |x| x.ejections,
        ),
    ];
    for (name, kind, help, get) in eps {
        e.family(name, kind, help);
        for x in &s.endpoints {
            e.sample(
                name,
                &[("upstream", &x.group), ("endpoint", &x.endpoint)],
                get(x),
            );
        }
    }

    let ls: [Family<super::ListenerSample>; 4] = [
        (
            "ringway_listener_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            |x| x.accepted,
        ),
        (
            "ringway_listener_connections_open",
            "gauge",
            "Client connections open.",
            |x| x.open,
        ),
        (
            "ringway_listener_tls_handshakes_total",
            "counter",
            "TLS handshakes with clients (successful or not).",
            |x| x.tls_handshakes,
        ),
        (
            "ringway_listener_tls_handshake_failures_total",
            "counter",
            "TLS handshakes with clients that failed or timed out.",
            |x| x.tls_failures,
        ),
    ];
    for (name, kind, help, get) in ls {
        e.family(name, kind, help);
        for x in &s.listeners {
            e.sample(name, &[("listener", &x.listener)], get(x));
        }
    }

    e.family(
        "ringway_access_log_lines_total",
        "counter",
        "Access log lines written into the workers' buffers.",
    );
    e.sample("ringway_access_log_lines_total", &[], s.access_log_lines);
    e.family(
        "ringway_access_log_dropped_total",
        "counter",
        "Access log lines dropped because a buffer was full (the writer fell behind).",
    );
    e.sample(
        "ringway_access_log_dropped_total",
        &[],
        s.access_log_dropped,
    );
    e.family(
        "ringway_access_log_write_lost_total",
        "counter",
        "Access log lines lost because writing them to their output failed (disk full, I/O error).",
    );
    e.sample(
        "ringway_access_log_write_lost_total",
        &[],
        s.access_log_write_lost,
    );

    if let Some(r) = &s.redis {
        e.family(
            "ringway_redis_up",
            "gauge",
            "1 while the Redis link for shared rate limits is up.",
        );
        e.sample("ringway_redis_up", &[], r.up as u64);
        e.family(
            "ringway_redis_commands_total",
            "counter",
            "Script calls sent to Redis.",
        );
        e.sample("ringway_redis_commands_total", &[], r.commands);
        e.family(
            "ringway_redis_round_trips_total",
            "counter",
            "Round trips to Redis (each batch of commands written at once and answered).",
        );
        e.sample("ringway_redis_round_trips_total", &[], r.round_trips);
        e.family(
            "ringway_redis_failures_total",
            "counter",
            "Failures of the Redis link for shared rate limits (refused, broken, late or malformed answers), retries included.",
        );
        e.sample("ringway_redis_failures_total", &[], r.failures);
        e.family(
            "ringway_redis_demands_refused_total",
            "counter",
            "Requests for Redis tokens refused because the link's queue was full (Redis slower than the demands); on_failure applied.",
        );
        e.sample(
            "ringway_redis_demands_refused_total",
            &[],
            r.demands_refused,
        );
    }

    if let Some(r) = &s.cache_redis {
        e.family(
            "ringway_cache_redis_up",
            "gauge",
            "1 while the Redis link of the response cache's shared layer is up.",
        );
        e.sample("ringway_cache_redis_up", &[], r.up as u64);
        let counters: [(&str, &str, u64); 13] = [
            (
                "ringway_cache_redis_commands_total",
                "Commands the cache's Redis link sent in rounds.",
                r.commands,
            ),
            (
                "ringway_cache_redis_round_trips_total",
                "Round trips of the cache's Redis link (each batch of commands written at once and answered).",
                r.round_trips,
            ),
            (
                "ringway_cache_redis_failures_total",
                "Failures of the cache's Redis link (refused, broken, late or malformed answers), retries included.",
                r.failures,
            ),
            (
                "ringway_cache_redis_commands_refused_total",
                "Cache commands refused because the Redis link's queue was full: a lookup missed, a write dropped.",
                r.commands_refused,
            ),
            (
                "ringway_cache_redis_commands_too_large_total",
                "Cache commands given up alone, the link left up, because a write or a reply over 1 MiB could not be moved within the link's timeout.",
                r.commands_too_large,
            ),
            (
                "ringway_cache_redis_lookups_total",
                "Entries the cache asked Redis for.",
                r.lookups,
            ),
            (
                "ringway_cache_redis_found_total",
                "Entries found in Redis and used.",
                r.found,
            ),
            (
                "ringway_cache_redis_writes_total",
                "Entries the cache wrote (queued) to Redis.",
                r.writes,
            ),
            (
                "ringway_cache_redis_purges_failed_total",
                "Purges whose Redis side failed (link down, queue full, an error answered): kept and sent again once the link is up, or on a timer (1 s doubling to 30 s) while it stays up; each failed try counts.",
                r.purges_failed,
            ),
            (
                "ringway_cache_redis_purges_given_up_total",
                "Purges kept to be sent again to Redis and folded, past 64 kept, into one purge of everything (which is kept and sent in their place).",
                r.purges_given_up,
            ),
            (
                "ringway_cache_redis_purges_heard_total",
                "Purges this host read from the purge log in Redis (its own included) and applied to its stores.",
                r.purges_heard,
            ),
            (
                "ringway_cache_redis_purge_log_gaps_total",
                "Times the purge log had lost purges this host had not read (trimmed past it, or Redis lost its data): every stored response of this host was purged.",
                r.purge_log_gaps,
            ),
            (
                "ringway_cache_redis_purge_log_errors_total",
                "Connections of the purge log's listener dropped because the log could not be read (an error answered, or a reply that is not one).",
                r.purge_log_errors,
            ),
        ];
        for (name, help, v) in counters {
            e.family(name, "counter", help);
            e.sample(name, &[], v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A checker of the text format's line grammar, for tests and for anyone mounting `/metrics`.

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    match chars.next() {
        Some(c) if first_ok(c) => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

fn is_value(s: &str) -> bool {
    matches!(s, "+Inf" | "-Inf" | "NaN") || s.parse::<f64>().is_ok()
}

/// One parsed sample line: its name, labels (unescaped) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses `name{a="b",...} value [timestamp]`.
pub fn parse_sample(line: &str) -> Result<Line, String> {
    let bad = |why: &str| Err(format!("{why}: {line:?}"));
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !is_name(name, true) {
        return bad("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let Some(eq) = rest.find('=') else {
                return bad("label without '='");
            };
            let lname = &rest[..eq];
            if !is_name(lname, false) {
                return bad("bad label name");
            }
            rest = &rest[eq + 1..];
            let Some(r) = rest.strip_prefix('"') else {
                return bad("label value not quoted");
            };
            let mut value = String::new();
            let mut chars = r.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return bad("bad escape in a label value"),
                    },
                    '\n' => return bad("raw line feed in a label value"),
                    c => value.push(c),
                }
            }
            let Some(end) = end else {
                return bad("unterminated label value");
            };
            if labels.iter().any(|(n, _): &(String, String)| n == lname) {
                return bad("repeated label");
            }
            labels.push((lname.to_string(), value));
            rest = &r[end + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return bad("expected ',' or '}' after a label");
            }
        }
    }
    let Some(r) = rest.strip_prefix(' ') else {
        return bad("no space before the value");
    };
    let mut parts = r.split(' ');
    let value = parts.next().unwrap_or("");
    if !is_value(value) {
        return bad("bad value");
    }
    if let Some(ts) = parts.next() {
        if ts.parse::<i64>().is_err() {
            return bad("bad timestamp");
        }
    }
    if parts.next().is_some() {
        return bad("trailing fields");
    }
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or(f64::NAN),
    };
    Ok(Line {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Checks a whole exposition: every line is a `# HELP`, a `# TYPE` (once per family, before
/// its samples) or a sample of a declared family; histogram buckets are cumulative, end with
/// `le="+Inf"`, and that bucket equals `_count`. Returns the samples.
pub fn check_exposition(text: &str) -> Result<Vec<Line>, String> {
    use std::collections::HashMap;
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line has no line feed".into());
    }
    for line in text.lines() {
        if let Some(c) = line.strip_prefix('#') {
            let mut f = c.trim_start().splitn(3, ' ');
            match (f.next(), f.next(), f.next()) {
                (Some("HELP"), Some(name), _) if is_name(name, true) => {}
                (Some("TYPE"), Some(name), Some(kind)) if is_name(name, true) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(format!("unknown type: {line:?}"));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(format!("family declared twice: {line:?}"));
                    }
                }
                (Some("HELP" | "TYPE"), _, _) => return Err(format!("bad comment: {line:?}")),
                _ => {}
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let s = parse_sample(line)?;
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                s.name
                    .strip_suffix(suf)
                    .filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&s.name);
        let Some(kind) = types.get(family) else {
            return Err(format!("sample before its # TYPE: {line:?}"));
        };
        if kind == "counter" && (s.value.is_nan() || s.value < 0.0) {
            return Err(format!("negative or NaN counter: {line:?}"));
        }
        samples.push(s);
    }
    // Histograms: cumulative buckets per label set, +Inf last and equal to _count.
    let mut series: HashMap<String, (f64, bool)> = HashMap::new();
    for s in &samples {
        if let Some(base) = s.name.strip_suffix("_bucket") {
            let key = series_key(base, &s.labels);
            let le = s
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("bucket without le: {}", s.name))?;
            let e = series.entry(key).or_insert((0.0, false));
            if e.1 {
                return Err(format!("bucket after +Inf: {} {le}", s.name));
            }
            if s.value < e.0 {
                return Err(format!("buckets not cumulative: {} le={le}", s.name));
            }
            *e = (s.value, le == "+Inf");
        }
    }
    for s in &samples {
        if let Some(base) = s.name.strip_suffix("_count") {
            if let Some((inf, closed)) = series.get(&series_key(base, &s.labels)) {
                if !closed || *inf != s.value {
                    return Err(format!("+Inf bucket differs from _count: {}", s.name));
                }
            }
        }
    }
    Ok(samples)
}

/// Checks OpenMetrics text as [`to_openmetrics`] writes it: `# EOF` last and once, no blank
/// line, each family's `# TYPE` (once) before its samples and its samples together, counter
/// families named without `_total` and their samples with it, histogram samples `_bucket`,
/// `_sum` and `_count`, other samples named as their family; then the text format's checks
/// (label grammar, cumulative buckets, `+Inf` equal to `_count`). Returns the samples.
pub fn check_openmetrics(text: &str) -> Result<Vec<Line>, String> {
    use std::collections::HashMap;
    let Some(body) = text.strip_suffix("# EOF\n") else {
        return Err("no # EOF line at the end".into());
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut current: Option<(String, String)> = None;
    let mut finished: Vec<String> = Vec::new();
    // The same exposition in the text format's naming, for its own checks.
    let mut as_text = String::with_capacity(body.len());
    for line in body.lines() {
        if line.is_empty() {
            return Err("a blank line".into());
        }
        if line == "# EOF" {
            return Err("# EOF before the end".into());
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line:?}"))?;
            if ![
                "counter",
                "gauge",
                "histogram",
                "gaugehistogram",
                "summary",
                "info",
                "stateset",
                "unknown",
            ]
            .contains(&kind)
            {
                return Err(format!("unknown type: {line:?}"));
            }
            if kind == "counter" && name.ends_with("_total") {
                return Err(format!("a counter family named with _total: {line:?}"));
            }
            if types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(format!("family declared twice: {line:?}"));
            }
            if let Some((prev, _)) = current.take() {
                finished.push(prev);
            }
            current = Some((name.to_string(), kind.to_string()));
            let text_name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let text_kind = if kind == "unknown" { "untyped" } else { kind };
            as_text.push_str(&format!("# TYPE {text_name} {text_kind}\n"));
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with('#') {
            return Err(format!("a comment OpenMetrics does not have: {line:?}"));
        }
        let s = parse_sample(line)?;
        let Some((family, kind)) = &current else {
            return Err(format!("sample before any # TYPE: {line:?}"));
        };
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count", "_created"],
            _ => &[""],
        };
        let ok = suffixes
            .iter()
            .any(|suf| s.name.strip_suffix(suf) == Some(family.as_str()));
        if !ok {
            let elsewhere = finished.iter().any(|f| s.name.starts_with(f.as_str()));
            return Err(if elsewhere {
                format!("a sample away from its family: {line:?}")
            } else {
                format!("sample not of family {family} ({kind}): {line:?}")
            });
        }
        if !s.name.ends_with("_created") {
            as_text.push_str(line);
            as_text.push('\n');
        }
    }
    check_exposition(&as_text)
}

fn series_key(base: &str, labels: &[(String, String)]) -> String {
    let mut k = base.to_string();
    for (n, v) in labels.iter().filter(|(n, _)| n != "le") {
        k.push('|');
        k.push_str(n);
        k.push('=');
        k.push_str(v);
    }
    k
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn sample_data() -> WorkerSample {
        let mut t = TrafficSample::default();
        t.status[2] = 3;
        t.status[4] = 1;
        t.errors[error_index(&crate::error::GatewayError::NoRoute)] = 1;
        t.latency[0].counts[0] = 2;
        t.latency[0].counts[14] = 1;
        t.latency[0].sum_us = 20_000_123;
        t.bytes_in = 10;
        WorkerSample {
            enabled: true,
            workers: 1,
            routes: vec![("we\"ird\\na\nme".into(), t.clone()), ("b".into(), t)],
            listeners: vec![ListenerSample {
                listener: "127.0.0.1:0".into(),
                accepted: 2,
                open: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_exposition_parses_and_escapes_labels() {
        let mut out = String::new();
        write_sample(&sample_data(), &mut out);
        let lines = check_exposition(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        // The odd route name comes back as it was.
        assert!(lines
            .iter()
            .any(|l| l.name == "ringway_route_requests_total"
                && l.labels
                    .contains(&("route".into(), "we\"ird\\na\nme".into()))
                && l.labels.contains(&("class".into(), "2xx".into()))
                && l.value == 3.0));
        let count = lines
            .iter()
            .find(|l| l.name == "ringway_route_request_duration_seconds_count")
            .expect("count");
        assert_eq!(count.value, 3.0);
        let sum = lines
            .iter()
            .find(|l| l.name == "ringway_route_request_duration_seconds_sum")
            .expect("sum");
        assert!((sum.value - 20.000123).abs() < 1e-9);
        assert!(out.contains("ringway_route_errors_total{route=\"b\",kind=\"no_route\"} 1\n"));
    }

    #[test]
    fn openmetrics_is_chosen_by_weight() {
        for (accept, om) in [
            (&b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"[..], true),
            (b"application/openmetrics-text", true),
            (b"Application/OpenMetrics-Text; version=\"1.0.0\"", true),
            (b"application/openmetrics-text; version=0.0.1", false),
            (b"application/openmetrics-text;q=0", false),
            (b"application/openmetrics-text;q=0.4, text/plain;q=0.5", false),
            (b"text/plain;version=0.0.4", false),
            (b"*/*", false),
            (b"application/openmetrics-text;q=2", false),
            (b"\xff\xfe", false),
            (b"", false),
        ] {
            assert_eq!(
                wants_openmetrics(accept),
                om,
                "{}",
                String::from_utf8_lossy(accept)
            );
        }
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let mut text = String::new();
        write_sample(&sample_data(), &mut text);
        text.push_str("# HELP odd A \"quoted\" help.\n# TYPE odd counter\nodd 3\n\n");
        let om = to_openmetrics(&text);
        assert!(om.ends_with("\n# EOF\n"), "{om}");
        assert!(om.contains("# TYPE ringway_route_requests counter\n"));
        assert!(om.contains("# HELP ringway_route_requests Requests"));
        assert!(om.contains("\nringway_route_requests_total{route=\"b\",class=\"2xx\"} 3\n"));
        assert!(om.contains("# TYPE ringway_workers gauge\nringway_workers 1\n"));
        assert!(om.contains("# HELP odd A \\\"quoted\\\" help.\n# TYPE odd counter\nodd_total 3\n"));
        assert!(!om.contains("\n\n"));
        let lines = check_openmetrics(&om).unwrap_or_else(|e| panic!("{e}\n{om}"));
        assert_eq!(
            lines.len(),
            check_exposition(&text).unwrap().len(),
            "every sample is kept"
        );
        for bad in [
            om.replace("# EOF\n", ""),
            om.replace("# TYPE odd counter", "# TYPE odd_total counter"),
            om.replace("odd_total 3", "odd 3"),
            format!("{om}x 1\n"),
            om.replacen("\n", "\n\n", 1),
        ] {
            assert!(check_openmetrics(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn merging_sums_by_label() {
        let a = sample_data();
        let m = WorkerSample::merge(vec![a.clone(), a]);
        assert_eq!(m.workers, 2);
        assert_eq!(m.route("b").map(|t| t.status[2]), Some(6));
        assert_eq!(m.listeners[0].accepted, 4);
    }

    #[test]
    fn the_checker_refuses_bad_lines() {
        for bad in [
            "x 1\n",                                     // no TYPE
            "# TYPE x counter\nx{a=\"b} 1\n",            // unterminated
            "# TYPE x counter\nx{a=\"\\q\"} 1\n",        // bad escape
            "# TYPE x counter\nx{1a=\"b\"} 1\n",         // bad label name
            "# TYPE x counter\nx one\n",                 // bad value
            "# TYPE x counter\nx -1\n",                  // negative counter
            "# TYPE x counter\n# TYPE x counter\nx 1\n", // declared twice
            "# TYPE x counter\nx 1",                     // no final line feed
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
        ] {
            assert!(check_exposition(bad).is_err(), "{bad:?}");
        }
        let good = "# HELP x a b\n# TYPE x counter\nx{a=\"\\\"\\\\\\n\"} 1 123\nx 2.5e3\n";
        assert_eq!(check_exposition(good).expect("good").len(), 2);
    }
}
