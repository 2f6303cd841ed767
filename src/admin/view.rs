//! The effective config as JSON, secrets redacted, for `/config` and `/routes`.
//!
//! Written field by field from the typed config rather than derived: a field appears here
//! only once someone decided how to show it, so a secret added to the config later cannot
//! leak through `/config` by default. Redacted: JWT secrets, introspection client secrets,
//! the Redis password, the admin token, TLS private key paths, consumers' API key hashes,
//! the query of fetch URLs, and the values of configured headers whose names look like
//! credentials. A secret that is set shows as `"<redacted>"`, one that is not as `null`.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::auth::config::{AuthConfig, RouteAuth, Secret};
use crate::config::{
    Balance, ByteSize, Config, Dur, HashOn, HeaderName, HeaderOps, OptDur, RateKey, RouteConfig,
    UpstreamConfig,
};

/// What a set secret shows as.
pub const REDACTED: &str = "<redacted>";

fn secret(s: &Option<Secret>) -> Value {
    match s {
        Some(_) => Value::from(REDACTED),
        None => Value::Null,
    }
}

fn redacted_if(set: bool) -> Value {
    if set {
        Value::from(REDACTED)
    } else {
        Value::Null
    }
}

/// "250ms", "10s": a duration as the config writes it.
pub fn dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn d(x: &Dur) -> Value {
    Value::from(dur(x.0))
}

fn od(x: &OptDur) -> Value {
    Value::from(x.0.map_or_else(|| "0s".to_string(), dur))
}

fn opt_d(x: &Option<Dur>) -> Value {
    x.as_ref().map_or(Value::Null, d)
}

fn size(b: &ByteSize) -> Value {
    Value::from(b.0)
}

/// A URL with its query (which may carry a key) redacted.
fn url(u: &str) -> Value {
    match u.split_once('?') {
        Some((base, _)) => Value::from(format!("{base}?{REDACTED}")),
        None => Value::from(u),
    }
}

/// Header names whose configured values are credentials more often than not.
fn sensitive_header(name: &str, api_key_header: &str) -> bool {
    const EXACT: &[&str] = &[
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
    ];
    const PARTS: &[&str] = &[
        "token",
        "secret",
        "key",
        "password",
        "passwd",
        "auth",
        "session",
        "credential",
        "signature",
    ];
    let n = name.to_ascii_lowercase();
    EXACT.contains(&n.as_str()) || n == api_key_header || PARTS.iter().any(|p| n.contains(p))
}

/// Header name -> value, the values of credential-like names redacted.
fn header_map<'a>(
    it: impl Iterator<Item = (&'a HeaderName, &'a String)>,
    api_key_header: &str,
) -> Value {
    let mut m = Map::new();
    for (k, v) in it {
        let v = if sensitive_header(&k.0, api_key_header) {
            REDACTED.to_string()
        } else {
            v.clone()
        };
        m.insert(k.0.clone(), Value::from(v));
    }
    Value::Object(m)
}

fn header_ops(o: &HeaderOps, api_key_header: &str) -> Value {
    json!({
        "add": header_map(o.add.iter(), api_key_header),
        "set": header_map(o.set.iter(), api_key_header),
        "remove": o.remove.iter().map(|h| h.0.clone()).collect::<Vec<_>>(),
    })
}

pub fn rate_key(k: &RateKey) -> String {
    match k {
        RateKey::ClientIp => "client_ip".into(),
        RateKey::Route => "route".into(),
        RateKey::Header(h) => format!("header:{h}"),
        RateKey::Consumer => "consumer".into(),
        RateKey::Claim(c) => format!("claim:{c}"),
    }
}

fn hash_on(h: &HashOn) -> String {
    match h {
        HashOn::ClientIp => "client_ip".into(),
        HashOn::Header(n) => format!("header:{n}"),
        HashOn::Cookie(n) => format!("cookie:{n}"),
    }
}

pub fn balance(b: Balance) -> &'static str {
    match b {
        Balance::RoundRobin => "round_robin",
        Balance::WeightedRoundRobin => "weighted_round_robin",
        Balance::LeastRequest => "least_request",
        Balance::PeakEwma => "peak_ewma",
        Balance::ConsistentHash => "consistent_hash",
    }
}

fn route_auth(a: &Option<RouteAuth>) -> Value {
    match a {
        None => Value::Null,
        Some(a) => json!({
            "any_of": a.any_of,
            "scopes_any": a.scopes_any,
            "scopes_all": a.scopes_all,
            "roles_any": a.roles_any,
            "roles_all": a.roles_all,
            "hide_credentials": a.hide_credentials,
        }),
    }
}

/// One route: how it matches, what it does, and the policies on the way.
pub fn route(i: usize, r: &RouteConfig, api_key_header: &str) -> Value {
    let action = match (&r.upstream, &r.direct) {
        (Some(u), _) => json!({ "upstream": u.get_ref() }),
        (None, Some(dc)) => json!({ "direct": {
            "status": dc.status,
            "body_bytes": dc.body.len(),
            "headers": header_map(dc.headers.iter(), api_key_header),
        }}),
        (None, None) => Value::Null,
    };
    let retry = r.retry.as_ref().map_or(Value::Null, |t| {
        json!({
            "attempts": t.attempts,
            "on": t.on,
            "backoff_base": d(&t.backoff_base),
            "backoff_max": d(&t.backoff_max),
            "budget_percent": t.budget_percent,
            "min_retries_per_second": t.min_retries_per_second,
            "non_idempotent": t.non_idempotent,
            "max_replay_bytes": size(&t.max_replay_bytes),
        })
    });
    let timeouts = r.timeouts.as_ref().map_or(Value::Null, |t| {
        json!({
            "client_body": opt_d(&t.client_body),
            "client_write": opt_d(&t.client_write),
            "upstream_connect": opt_d(&t.upstream_connect),
            "upstream_response": opt_d(&t.upstream_response),
            "upstream_body": opt_d(&t.upstream_body),
        })
    });
    json!({
        "index": i,
        "name": r.name.clone().unwrap_or_else(|| format!("route#{i}")),
        "match": {
            "hosts": r.hosts,
            "path": r.path,
            "path_prefix": r.path_prefix,
            "path_regex": r.path_regex,
            "methods": r.methods,
            "headers": header_map(r.headers.iter(), api_key_header),
        },
        "action": action,
        "rewrite": {
            "strip_prefix": r.strip_prefix,
            "replace_prefix": r.replace_prefix,
            "preserve_host": r.preserve_host,
            "set_host": r.set_host,
            "request_headers": header_ops(&r.request_headers, api_key_header),
            "response_headers": header_ops(&r.response_headers, api_key_header),
        },
        "policies": {
            "auth": route_auth(&r.auth),
            "require_client_cert": r.require_client_cert,
            "rate_limits": r.rate_limits.iter().map(|l| json!({
                "name": l.name,
                "key": rate_key(&l.key),
                "rate": l.rate,
                "per": d(&l.per),
                "burst": l.burst,
            })).collect::<Vec<_>>(),
            "quotas": r.quotas.iter().map(|q| json!({
                "name": q.name,
                "key": rate_key(&q.key),
                "limit": q.limit,
                "period": format!("{:?}", q.period).to_ascii_lowercase(),
            })).collect::<Vec<_>>(),
            "concurrency": r.concurrency.as_ref().map(|c| json!({
                "max": c.max,
                "key": rate_key(&c.key),
            })),
            "max_body_bytes": r.max_body_bytes.as_ref().map(size),
            "retry": retry,
            "timeouts": timeouts,
            "trailers": format!("{:?}", r.trailers).to_ascii_lowercase(),
        },
    })
}

/// The route table, in config order (the order routes are matched in when several fit).
pub fn routes(cfg: &Config) -> Value {
    let h = &cfg.auth.api_key.header.0;
    Value::Array(
        cfg.routes
            .iter()
            .enumerate()
            .map(|(i, r)| route(i, r, h))
            .collect(),
    )
}

fn upstream(u: &UpstreamConfig) -> Value {
    json!({
        "endpoints": u.endpoints.iter().map(|e| json!({
            "address": e.address.text,
            "resolved": e.address.addr.to_string(),
            "weight": e.weight,
        })).collect::<Vec<_>>(),
        "balance": balance(u.balance),
        "max_idle": match u.max_idle {
            crate::config::IdleCap::Auto => Value::from("auto"),
            crate::config::IdleCap::Fixed(n) => Value::from(n),
        },
        "idle_timeout": d(&u.idle_timeout),
        "hash_on": u.hash_on.as_ref().map(hash_on),
        "health_check": u.health_check.as_ref().map(|h| json!({
            "path": h.path,
            "host": h.host,
            "interval": d(&h.interval),
            "timeout": d(&h.timeout),
            "healthy_threshold": h.healthy_threshold,
            "unhealthy_threshold": h.unhealthy_threshold,
            "expected_statuses": h.expected_statuses,
        })),
        "outlier": {
            "consecutive_failures": u.outlier.consecutive_failures,
            "base_ejection_time": d(&u.outlier.base_ejection_time),
            "max_ejection_time": d(&u.outlier.max_ejection_time),
            "max_ejection_percent": u.outlier.max_ejection_percent,
        },
        "circuit_breaker": u.circuit_breaker.as_ref().map(|b| json!({
            "max_connections": b.max_connections,
            "max_pending": b.max_pending,
            "max_requests": b.max_requests,
            "error_rate": b.error_rate,
            "min_requests": b.min_requests,
            "window": d(&b.window),
            "open_for": d(&b.open_for),
            "half_open_probes": b.half_open_probes,
        })),
        "tls": u.tls.as_ref().map(|t| json!({
            "ca": t.ca,
            "sni": t.sni,
            "client_cert": t.client_cert,
            "client_key": redacted_if(t.client_key.is_some()),
            "verify": t.verify,
        })),
    })
}

fn auth(a: &AuthConfig) -> Value {
    let h = &a.api_key.header.0;
    let jwt: Map<String, Value> = a
        .jwt
        .iter()
        .map(|(name, j)| {
            (
                name.clone(),
                json!({
                    "secret": secret(&j.secret),
                    "secret_base64": secret(&j.secret_base64),
                    "public_key_file": j.public_key_file,
                    "jwks_file": j.jwks_file,
                    "jwks_url": j.jwks_url.as_deref().map(url),
                    "ca": j.ca,
                    "algorithm": j.algorithm,
                    "algorithms": j.algorithms,
                    "kid": j.kid,
                    "issuers": j.issuers,
                    "audiences": j.audiences,
                    "typ": j.typ,
                    "leeway_seconds": j.leeway_seconds,
                    "required_claims": j.required_claims,
                    "scope_claim": j.scope_claim,
                    "roles_claim": j.roles_claim,
                    "consumer_claim": j.consumer_claim,
                    "forward_claims": j.forward_claims.iter()
                        .map(|(c, hn)| (c.clone(), Value::from(hn.0.clone())))
                        .collect::<Map<_, _>>(),
                    "jwks_min_ttl": dur(j.jwks_min_ttl()),
                    "jwks_max_ttl": dur(j.jwks_max_ttl()),
                    "jwks_min_refresh_interval": dur(j.jwks_min_refresh_interval()),
                    "jwks_grace": dur(j.jwks_grace()),
                    "jwks_timeout": dur(j.jwks_timeout()),
                }),
            )
        })
        .collect();
    let introspection: Map<String, Value> = a
        .introspection
        .iter()
        .map(|(name, i)| {
            (
                name.clone(),
                json!({
                    "url": url(&i.url),
                    "ca": i.ca,
                    "client_id": i.client_id,
                    "client_secret": REDACTED,
                    "timeout": d(&i.timeout),
                    "max_concurrent": i.max_concurrent,
                    "cache_max_ttl": d(&i.cache_max_ttl),
                    "forward_claims": i.forward_claims.iter()
                        .map(|(c, hn)| (c.clone(), Value::from(hn.0.clone())))
                        .collect::<Map<_, _>>(),
                    "consumer_claim": i.consumer_claim,
                    "negative_cache_ttl": d(&i.negative_cache_ttl),
                }),
            )
        })
        .collect();
    json!({
        "realm": a.realm,
        "cache_size": a.cache_size,
        "cache_max_ttl": d(&a.cache_max_ttl),
        "consumer_header": a.consumer_header.0,
        "api_key": { "header": h, "query": a.api_key.query },
        "jwt": jwt,
        "introspection": introspection,
    })
}

/// The whole effective config (defaults filled in), secrets redacted.
pub fn config(cfg: &Config) -> Value {
    let s = &cfg.server;
    let t = &cfg.timeouts;
    let rl = &cfg.rate_limiting;
    json!({
        "server": {
            "workers": s.workers,
            "effective_workers": cfg.worker_count(),
            "driver": format!("{:?}", s.driver).to_ascii_lowercase(),
            "shutdown_timeout": d(&s.shutdown_timeout),
            "via": s.via,
            "max_connections_per_worker": s.max_connections_per_worker,
            "trusted_proxies": s.trusted_proxies.entries(),
        },
        "limits": {
            "max_head_bytes": size(&cfg.limits.max_head_bytes),
            "max_headers": cfg.limits.max_headers,
            "max_uri_bytes": size(&cfg.limits.max_uri_bytes),
            "max_body_bytes": size(&cfg.limits.max_body_bytes),
        },
        "timeouts": {
            "client_head": d(&t.client_head),
            "client_idle": d(&t.client_idle),
            "client_body": d(&t.client_body),
            "client_write": d(&t.client_write),
            "upstream_connect": d(&t.upstream_connect),
            "upstream_response": d(&t.upstream_response),
            "upstream_body": d(&t.upstream_body),
            "upstream_write": d(&t.upstream_write),
            "client_body_total": od(&t.client_body_total),
            "upstream_body_total": od(&t.upstream_body_total),
        },
        "listeners": cfg.listeners.iter().map(|l| json!({
            "name": l.name,
            "address": l.address.text,
            "backlog": l.backlog,
            "allow_trace": l.allow_trace,
            "allow_underscores_in_headers": l.allow_underscores_in_headers,
            "redirect_https": l.redirect_https.as_ref().map(|r| json!({ "port": r.port })),
            "tls": l.tls.as_ref().map(|t| json!({
                "certificates": t.certificates.iter().map(|c| json!({
                    "cert": c.cert,
                    "key": REDACTED,
                })).collect::<Vec<_>>(),
                "min_version": match t.min_version {
                    crate::config::TlsVersion::Tls12 => "1.2",
                    crate::config::TlsVersion::Tls13 => "1.3",
                },
                "session_cache": t.session_cache,
                "session_tickets": t.session_tickets,
                "client_auth": t.client_auth.as_ref().map(|c| json!({
                    "ca": c.ca,
                    "mode": format!("{:?}", c.mode).to_ascii_lowercase(),
                    "subject_header": c.subject_header.0,
                })),
            })),
        })).collect::<Vec<_>>(),
        "upstreams": cfg.upstreams.iter()
            .map(|(n, u)| (n.clone(), upstream(u)))
            .collect::<Map<_, _>>(),
        "routes": routes(cfg),
        "rate_limiting": {
            "max_keys": rl.max_keys,
            "backend": format!("{:?}", rl.backend).to_ascii_lowercase(),
            "redis": rl.redis.as_ref().map(|r| json!({
                "address": r.address.text,
                "password": redacted_if(r.password.is_some()),
                "timeout": d(&r.timeout),
                "on_failure": format!("{:?}", r.on_failure).to_ascii_lowercase(),
                "key_prefix": r.key_prefix,
                "retry_interval": d(&r.retry_interval),
            })),
        },
        "auth": auth(&cfg.auth),
        "consumers": cfg.consumers.iter().map(|c| json!({
            "name": c.name,
            "metadata": c.metadata,
            "api_keys": c.api_keys.iter().map(|_| REDACTED).collect::<Vec<_>>(),
            "jwt_subjects": c.jwt_subjects,
            "scopes": c.scopes,
        })).collect::<Vec<_>>(),
        "admin": cfg.admin.as_ref().map(|a| json!({
            "enabled": a.enabled,
            "address": a.address.text,
            "token": secret(&a.token),
            "token_env": a.token_env,
            "drain_delay": od(&a.drain_delay),
            "max_connections": a.max_connections,
            "request_timeout": d(&a.request_timeout),
            "idle_timeout": d(&a.idle_timeout),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_like_header_names_are_redacted() {
        for n in [
            "authorization",
            "x-api-key",
            "x-auth-user",
            "x-upstream-token",
            "cookie",
        ] {
            assert!(sensitive_header(n, "x-api-key"), "{n}");
        }
        for n in ["x-served-by", "content-type", "x-env"] {
            assert!(!sensitive_header(n, "x-api-key"), "{n}");
        }
        assert!(sensitive_header("x-my-key-header", "x-other"));
        assert!(sensitive_header("x-custom", "x-custom"));
    }

    #[test]
    fn durations_read_as_the_config_writes_them() {
        assert_eq!(dur(Duration::from_millis(250)), "250ms");
        assert_eq!(dur(Duration::from_secs(10)), "10s");
        assert_eq!(dur(Duration::ZERO), "0s");
        assert_eq!(
            url("https://idp/keys?key=abc"),
            Value::from("https://idp/keys?<redacted>")
        );
    }
}
