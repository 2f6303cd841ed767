//! JWT key sets shared with the workers, and the background fetch of JWKS URLs.
//!
//! A [`KeySource`] holds the current key set behind a mutex with a version number beside it.
//! Workers read the version (one atomic load) every 50 ms and take the set only when it
//! changed; the request path reads the worker's own copy.
//!
//! One thread per JWKS URL fetches the set with the gateway's HTTP/1.1 client
//! ([`crate::http::client`], on a small monoio runtime of its own; TLS for https URLs with the
//! client config built once, at start), a body of at most [`MAX_JWKS_BYTES`]:
//! - next fetch after `Cache-Control: max-age`, clamped to [`jwks_min_ttl`, `jwks_max_ttl`];
//! - a worker meeting an unknown `kid` asks for a refresh, honoured at most once per
//!   `jwks_min_refresh_interval`;
//! - keys that disappear from the set stay accepted for `jwks_grace` (tokens signed just
//!   before a rotation keep working);
//! - a failed fetch (a certificate that does not verify included) keeps the last good keys and
//!   is retried after `jwks_min_refresh_interval`; it is logged once, and again only when the
//!   reason changes;
//! - a well-formed set with no usable key is no failure: the keys in service have left it, and
//!   stay accepted for `jwks_grace` only, as after a rotation; it is retried and logged as a
//!   failed fetch is.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use super::config::JwtConfig;
use super::jwt::{self, KeySet};
use crate::http::client::{self, Target};
use crate::{info, warn};

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// Skipped keys named in the log per change of the fetched set (the rest are counted).
const MAX_LOGGED_NOTES: usize = 8;
/// How often a fetcher thread looks at its flags while waiting.
const TICK: Duration = Duration::from_millis(50);

/// A provider's key set as published to the workers.
pub struct KeySource {
    current: Mutex<Arc<KeySet>>,
    version: AtomicU64,
    refresh: AtomicBool,
    /// Set for JWKS URL providers: the provider's settings and where to fetch.
    url: Option<(JwtConfig, Endpoint)>,
}

impl KeySource {
    pub fn fixed(set: KeySet) -> KeySource {
        KeySource {
            current: Mutex::new(Arc::new(set)),
            version: AtomicU64::new(1),
            refresh: AtomicBool::new(false),
            url: None,
        }
    }

    /// A JWKS URL provider's source: empty until its fetcher publishes a set.
    pub fn fetched(cfg: JwtConfig, endpoint: Endpoint) -> KeySource {
        KeySource {
            current: Mutex::new(Arc::new(KeySet::default())),
            version: AtomicU64::new(0),
            refresh: AtomicBool::new(false),
            url: Some((cfg, endpoint)),
        }
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current set and its version.
    pub fn current(&self) -> (Arc<KeySet>, u64) {
        let g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (g.clone(), self.version.load(Ordering::Acquire))
    }

    pub fn publish(&self, set: KeySet) {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *g = Arc::new(set);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Asks the fetcher (if any) for a refresh.
    pub fn want_refresh(&self) {
        if self.url.is_some() {
            self.refresh.store(true, Ordering::Relaxed);
        }
    }
}

/// `http[s]://host[:port]/path`, resolved when the config loads.
#[derive(Clone, Debug)]
pub struct HttpUrl {
    /// The authority as written (the `Host` header).
    pub host: String,
    pub addr: SocketAddr,
    pub path: String,
    /// `https://`: the name the server's certificate is verified against (the URL's host,
    /// also sent as SNI when it is a DNS name).
    pub https: Option<ServerName<'static>>,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let (rest, https, default_port) = if let Some(r) = url.strip_prefix("https://") {
            (r, true, 443)
        } else if let Some(r) = url.strip_prefix("http://") {
            (r, false, 80)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(p) => (&rest[..p], &rest[p..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url:?}: expected http[s]://host[:port]/path"));
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{url:?}: the path holds spaces or control characters"
            ));
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        let https = if https {
            Some(crate::tls::endpoint_name(None, &with_port).ok_or_else(|| {
                format!("{url:?}: the host is not a TLS server name (DNS name or IP)")
            })?)
        } else {
            None
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {authority:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority:?} resolves to no address"))?;
        Ok(HttpUrl {
            host: authority.to_string(),
            addr,
            path: path.to_string(),
            https,
        })
    }
}

/// An endpoint the gateway calls itself (a JWKS URL, an introspection endpoint): its URL and,
/// for https, the client config and the name to verify. Built once (at load to check it, at
/// start to use it) and shared by every call.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: HttpUrl,
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Endpoint {
    /// Parses `url` and, for https, builds its client config: verified against the CA bundle
    /// `ca`, else the webpki roots. Errors: (key, reason), the key being `url_key` or `ca`.
    pub fn load(url: &str, ca: Option<&str>, url_key: &str) -> Result<Endpoint, (String, String)> {
        let url = HttpUrl::parse(url).map_err(|r| (url_key.to_string(), r))?;
        let tls = match &url.https {
            Some(name) => {
                let cfg =
                    crate::tls::https_client_config(ca, "ca").map_err(|e| (e.key, e.reason))?;
                Some((cfg, name.clone()))
            }
            None if ca.is_some() => {
                return Err(("ca".into(), format!("only used with an https:// {url_key}")))
            }
            None => None,
        };
        Ok(Endpoint { url, tls })
    }

    /// Where the gateway's client sends requests for this endpoint.
    pub fn target(&self) -> Target {
        match &self.tls {
            None => Target::plain(self.url.addr),
            Some((cfg, name)) => Target::tls(self.url.addr, cfg.clone(), name.clone()),
        }
    }
}

/// The `max-age` of a `Cache-Control` value (the smallest, if repeated); `no-cache` and
/// `no-store` count as 0 (RFC 9111 §5.2.2).
pub fn max_age(value: &[u8], out: &mut Option<u64>) {
    for d in crate::http::list_items(value) {
        if d.eq_ignore_ascii_case(b"no-cache") || d.eq_ignore_ascii_case(b"no-store") {
            *out = Some(0);
        } else if d.len() > 8 && d[..8].eq_ignore_ascii_case(b"max-age=") {
            let v = &d[8..];
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            let a = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(a) = a {
                *out = Some(out.map_or(a, |m| m.min(a)));
            }
        }
    }
}

/// `now + d`, with `d` capped at a year (config durations are not trusted to be small).
fn later(now: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now.checked_add(d.min(YEAR)).unwrap_or(now)
}

/// A retired key and the moment it stops being accepted.
struct Retired {
    key: jwt::JwtKey,
    until: Instant,
}

/// Starts one fetcher thread per JWKS URL provider; they stop when `stop` is set.
pub fn spawn_fetchers(
    names: Vec<String>,
    sources: &[Arc<KeySource>],
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    for (name, src) in names.into_iter().zip(sources) {
        let Some((cfg, endpoint)) = src.url.clone() else {
            continue;
        };
        let src = src.clone();
        let stop = stop.clone();
        let label = name.clone();
        let t = std::thread::Builder::new()
            .name(format!("ringway-jwks-{name}"))
            .spawn(move || {
                // The fetcher runs the gateway's async client (one HTTP codec for every
                // peer) on a runtime of its own. The legacy (epoll) driver: one fetch at a
                // time needs no io_uring, nor the locked memory each ring takes.
                let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build();
                match rt {
                    Ok(mut rt) => rt.block_on(fetch_loop(&name, &cfg, &endpoint, &src, &stop)),
                    Err(e) => warn!("auth.jwt.{name}: cannot start the JWKS fetcher: {e}"),
                }
            });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => warn!("cannot start the JWKS fetcher of {label}: {e}"),
        }
    }
    threads
}

async fn fetch_loop(
    name: &str,
    cfg: &JwtConfig,
    ep: &Endpoint,
    src: &KeySource,
    stop: &AtomicBool,
) {
    let _late = crate::tls::LateCloses::allow();
    let target = ep.target();
    let request = client::request(
        "GET",
        &ep.url.path,
        &ep.url.host,
        "accept: application/json\r\nuser-agent: ringway\r\n",
        None,
        false,
    );
    let allowed = jwt::allowed_algs(cfg);
    let mut fresh: Vec<jwt::JwtKey> = Vec::new();
    let mut retired: Vec<Retired> = Vec::new();
    let mut last_fetch: Option<Instant> = None;
    // The reason of the last failure logged, while fetches keep failing.
    let mut failing: Option<String> = None;
    // The keys skipped by the last fetch, as logged.
    let mut skipped: Vec<String> = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let asked = src.refresh.load(Ordering::Relaxed)
            && last_fetch.is_none_or(|t| now >= later(t, cfg.jwks_min_refresh_interval()));
        let expired = retired.iter().any(|r| r.until <= now);
        if now >= next || asked {
            src.refresh.store(false, Ordering::Relaxed);
            last_fetch = Some(now);
            match fetch_set(&target, &request, cfg.jwks_timeout(), &allowed).await {
                Ok((set, notes, _)) if set.keys.is_empty() => {
                    // A well-formed set without a usable key: every key in service has left
                    // it. They are retired as keys leaving a rotation are, accepted for
                    // `jwks_grace` more and then dropped (an identity provider can revoke all
                    // its keys); the set is asked for again as after a failure, so that keys
                    // coming back (a provider's passing glitch) serve again at once.
                    let reason = jwt::no_usable_key(&notes);
                    if failing.as_deref() != Some(reason.as_str()) {
                        warn!("auth.jwt.{name}: the JWKS URL answered with no usable key ({reason}); the {} keys in service stay accepted for {}s at most (jwks_grace), retrying every {}ms",
                            fresh.len(),
                            cfg.jwks_grace().as_secs(),
                            cfg.jwks_min_refresh_interval().as_millis());
                        failing = Some(reason);
                    }
                    next = later(now, cfg.jwks_min_refresh_interval());
                    if !fresh.is_empty() {
                        retire(
                            &mut fresh,
                            &mut retired,
                            Vec::new(),
                            later(now, cfg.jwks_grace()),
                        );
                        publish(src, &fresh, &mut retired, now);
                    } else if expired {
                        publish(src, &fresh, &mut retired, now);
                    }
                }
                Ok((set, notes, max_age)) => {
                    let ttl = max_age
                        .map_or(cfg.jwks_max_ttl(), Duration::from_secs)
                        .clamp(cfg.jwks_min_ttl(), cfg.jwks_max_ttl());
                    next = later(now, ttl);
                    retire(
                        &mut fresh,
                        &mut retired,
                        set.keys,
                        later(now, cfg.jwks_grace()),
                    );
                    failing = None;
                    // Keys the set holds but the gateway does not use (symmetric ones), logged
                    // when they change, at most MAX_LOGGED_NOTES lines (a set may hold
                    // thousands).
                    if notes != skipped {
                        for n in notes.iter().take(MAX_LOGGED_NOTES) {
                            warn!("auth.jwt.{name}: JWKS URL: {n}");
                        }
                        if notes.len() > MAX_LOGGED_NOTES {
                            warn!(
                                "auth.jwt.{name}: JWKS URL: {} more keys skipped",
                                notes.len() - MAX_LOGGED_NOTES
                            );
                        }
                        skipped = notes;
                    }
                    info!(
                        "auth.jwt.{name}: {} keys from the JWKS URL ({} in their grace period); next refresh in {}s",
                        fresh.len(),
                        retired.len(),
                        ttl.as_secs()
                    );
                    publish(src, &fresh, &mut retired, now);
                }
                Err(e) => {
                    // The last good keys stay in service. The reason names no secret (a JWKS
                    // request carries none); it is logged once per streak of failures.
                    if failing.as_deref() != Some(e.as_str()) {
                        warn!("auth.jwt.{name}: JWKS fetch failed ({e}); keeping the last keys, retrying every {}ms",
                            cfg.jwks_min_refresh_interval().as_millis());
                        failing = Some(e);
                    }
                    next = later(now, cfg.jwks_min_refresh_interval());
                }
            }
        } else if expired {
            publish(src, &fresh, &mut retired, now);
        }
        monoio::time::sleep(TICK).await;
    }
}

/// Replaces the keys in service (`fresh`) with a newly fetched set. Keys gone from the set are
/// kept in `retired` until `until` (the grace period); a retired key that is back in the set
/// leaves `retired`. Keys are matched by kid, and keys without a kid by their key material,
/// so a key that stays in the set is never retired.
fn retire(
    fresh: &mut Vec<jwt::JwtKey>,
    retired: &mut Vec<Retired>,
    set: Vec<jwt::JwtKey>,
    until: Instant,
) {
    for old in fresh.drain(..) {
        if !set.iter().any(|k| k.same_key(&old)) {
            retired.push(Retired { key: old, until });
        }
    }
    retired.retain(|r| !set.iter().any(|k| k.same_key(&r.key)));
    *fresh = set;
}

fn publish(src: &KeySource, fresh: &[jwt::JwtKey], retired: &mut Vec<Retired>, now: Instant) {
    retired.retain(|r| r.until > now);
    let keys = fresh
        .iter()
        .cloned()
        .chain(retired.iter().map(|r| r.key.clone()))
        .collect();
    src.publish(KeySet::new(keys));
}

async fn fetch_set(
    target: &Target,
    request: &[u8],
    timeout: Duration,
    allowed: &[jsonwebtoken::Algorithm],
) -> Result<(KeySet, Vec<String>, Option<u64>), String> {
    let r = client::fetch(target, request.to_vec(), false, MAX_JWKS_BYTES, timeout)
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let mut age = None;
    for v in r.header_values(b"cache-control") {
        max_age(v, &mut age);
    }
    let (set, notes) = jwt::parse_jwk_set(&r.body, allowed, jwt::JwksOrigin::Url)?;
    Ok((set, notes, age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lifetimes() {
        let age = |vals: &[&[u8]]| {
            let mut a = None;
            for v in vals {
                max_age(v, &mut a);
            }
            a
        };
        assert_eq!(age(&[b"public, max-age=120"]), Some(120));
        assert_eq!(age(&[b"max-age=\"60\""]), Some(60));
        assert_eq!(age(&[b"max-age=600", b"Max-Age=30"]), Some(30));
        assert_eq!(age(&[b"max-age=600, no-cache"]), Some(0));
        assert_eq!(age(&[b"max-age=x", b"max-age=-1"]), None);
        assert_eq!(age(&[b"max-age=99999999999999999999999"]), None);
        assert_eq!(age(&[b"private"]), None);
    }

    /// Keys without a kid are the same key across fetches when their material is; only keys
    /// that left the set are retired, once, and a key back in the set leaves the grace list.
    #[test]
    fn only_keys_gone_from_the_set_are_retired() {
        let rsa = |file: &str, kid: Option<&str>| {
            let mut k: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(format!(
                    "{}/tests/data/auth/{file}",
                    env!("CARGO_MANIFEST_DIR")
                ))
                .unwrap(),
            )
            .unwrap();
            match kid {
                Some(kid) => k["kid"] = kid.into(),
                None => {
                    k.as_object_mut().unwrap().remove("kid");
                }
            }
            k
        };
        let parse = |keys: Vec<serde_json::Value>| {
            jwt::parse_jwks(
                serde_json::json!({ "keys": keys }).to_string().as_bytes(),
                &[],
                jwt::JwksOrigin::Url,
            )
            .unwrap()
            .0
            .keys
        };
        let (a, b) = (rsa("rsa_jwk.json", None), rsa("rsa2_jwk.json", None));
        let k = rsa("rsa3_jwk.json", Some("k"));
        let until = Instant::now() + Duration::from_secs(60);
        let mut fresh = Vec::new();
        let mut retired = Vec::new();
        for _ in 0..5 {
            retire(
                &mut fresh,
                &mut retired,
                parse(vec![a.clone(), b.clone(), k.clone()]),
                until,
            );
        }
        assert_eq!((fresh.len(), retired.len()), (3, 0));
        retire(&mut fresh, &mut retired, parse(vec![a.clone()]), until);
        assert_eq!((fresh.len(), retired.len()), (1, 2));
        retire(&mut fresh, &mut retired, parse(vec![a.clone()]), until);
        assert_eq!((fresh.len(), retired.len()), (1, 2));
        // B is back: no longer in its grace period.
        retire(&mut fresh, &mut retired, parse(vec![a, b]), until);
        assert_eq!((fresh.len(), retired.len()), (2, 1));
        assert_eq!(retired[0].key.kid.as_deref(), Some("k"));
    }

    #[test]
    fn later_never_overflows() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/keys").unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (8080, "/keys"));
        assert_eq!(HttpUrl::parse("http://127.0.0.1").unwrap().path, "/");
        assert!(u.https.is_none());
        let u = HttpUrl::parse("https://127.0.0.1/keys").unwrap();
        assert_eq!(u.addr.port(), 443);
        assert_eq!(
            u.https,
            Some(ServerName::try_from("127.0.0.1".to_string()).unwrap())
        );
        let u = HttpUrl::parse("https://[::1]:8443/").unwrap();
        assert_eq!(
            (u.addr.port(), u.host.as_str(), u.https),
            (
                8443,
                "[::1]:8443",
                Some(ServerName::try_from("::1".to_string()).unwrap())
            )
        );
        assert!(HttpUrl::parse("ftp://x/").is_err());
        assert!(HttpUrl::parse("https://u@127.0.0.1/").is_err());
        assert!(HttpUrl::parse("http://u:p@127.0.0.1/").is_err());
    }

    #[test]
    fn endpoints_build_a_client_config_for_https_only() {
        let ep = Endpoint::load("https://127.0.0.1:8443/k", None, "jwks_url").unwrap();
        assert!(ep.tls.is_some(), "https verifies against the webpki roots");
        assert!(Endpoint::load("http://127.0.0.1/k", None, "url")
            .unwrap()
            .tls
            .is_none());
        let (k, r) = Endpoint::load("http://127.0.0.1/k", Some("ca.pem"), "url").unwrap_err();
        assert_eq!(
            (k.as_str(), r.as_str()),
            ("ca", "only used with an https:// url")
        );
        let (k, r) =
            Endpoint::load("https://127.0.0.1/k", Some("/nonexistent/ca.pem"), "url").unwrap_err();
        assert_eq!(k, "ca");
        assert!(
            r.contains("/nonexistent/ca.pem") && r.contains("cannot read"),
            "{r}"
        );
        let (k, _) = Endpoint::load("https://", None, "url").unwrap_err();
        assert_eq!(k, "url");
    }
}
