//! OAuth2 token introspection (RFC 7662) from the worker, on monoio.
//!
//! For an opaque bearer token the worker POSTs `token=...` to the endpoint with its client
//! credentials (HTTP Basic, RFC 6749 §2.3.1) with the gateway's HTTP/1.1 client
//! ([`crate::http::client`]), over a keep-alive connection of the worker's pool for that
//! endpoint (TLS for https URLs, with the client config built once at start), within `timeout`
//! for the whole exchange: connect, handshake, request and answer. Answers with
//! `active: true` are cached per core (see [`super::WorkerAuth`]) until the token's `exp` or
//! the configured maximum.
//!
//! Refusals are cached too, briefly (`negative_cache_ttl`, at most
//! [`NEGATIVE_CACHE_ENTRIES`] tokens per worker): a token found inactive is 401 again, and a
//! token the endpoint failed to judge is 503 again, without a call, until the entry expires.
//!
//! Each worker runs at most `max_concurrent` calls at once. A request over that bound is not
//! queued: it is answered 503 with `Retry-After: 1` at once, so a slow endpoint cannot pile up
//! waiting requests. A failed or timed-out call is also a 503 (the gateway cannot tell), never a
//! 401; a failed TLS handshake (a certificate that does not verify) is such a
//! failure. The first such failure after a usable answer is logged at warn level (per
//! worker), the next ones at debug level, and the first usable answer after them at info.

use std::cell::{Cell, RefCell};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::config::IntrospectionConfig;
use super::jwks::Endpoint;
use super::AuthFail;
use crate::debug;
use crate::http::client::{self, Pool};

/// Largest introspection answer accepted (RFC 7662 answers are a few hundred bytes).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Idle keep-alive connections kept per endpoint and worker.
pub const POOL_MAX_IDLE: usize = 8;
/// How long an idle keep-alive connection is kept (an endpoint that closes sooner is noticed
/// when the connection is taken out, and the call goes over a new one).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Refused tokens remembered per endpoint and worker by the negative cache; the oldest and
/// least used go first.
pub const NEGATIVE_CACHE_ENTRIES: usize = 4096;

/// A checked answer.
pub struct Answer {
    pub claims: Map<String, Value>,
    /// `exp`, in whole seconds (a fraction is dropped, so never later than the answer says;
    /// a negative value reads as 0, long past).
    pub exp: Option<u64>,
    /// Whether the answer may be cached: not when its `exp` is a number but not the integer
    /// RFC 7662 §2.2 defines (see [`answer_exp`]).
    pub cacheable: bool,
    /// `nbf`, in whole seconds, a fraction rounded up (so never earlier than the answer says).
    pub nbf: Option<u64>,
}

/// Seconds of clock difference allowed between the gateway and the authorization server when
/// an answer's `nbf` is compared (the JWT providers' default `leeway_seconds`).
pub const NBF_LEEWAY_SECS: u64 = 30;

/// Reads an answer's `nbf` and checks its `iat` (RFC 7662 §2.2: integers, seconds since the
/// epoch). `nbf` absent or `null`: none; a number: rounded up (a negative one is 0). `None`
/// when either is anything but a number or `null` (a string, a boolean, an array, an object):
/// an answer the gateway cannot judge, as for `exp` (503).
pub fn answer_nbf(claims: &Map<String, Value>) -> Option<Option<u64>> {
    if !matches!(
        claims.get("iat"),
        None | Some(Value::Null) | Some(Value::Number(_))
    ) {
        return None;
    }
    match claims.get("nbf") {
        None | Some(Value::Null) => Some(None),
        Some(Value::Number(n)) => Some(Some(match n.as_u64() {
            Some(v) => v,
            // `as` saturates: huge values stay huge, negative ones become 0.
            None => n.as_f64().unwrap_or(0.0).ceil().max(0.0) as u64,
        })),
        Some(_) => None,
    }
}

/// Reads an answer's `exp` (RFC 7662 §2.2: an integer, seconds since the epoch). Absent or
/// `null`: none. An unsigned integer: as it is. Any other number (a fraction, a negative, an
/// exponent form) is compared as a number, rounded down, and makes the answer uncacheable.
/// Anything else (a string, a boolean, an array, an object) is an answer the gateway cannot
/// judge: `None`. Never read as "no exp": that would cache the answer for `cache_max_ttl` and
/// accept a token past its expiry (RFC 7662 §4).
pub fn answer_exp(claims: &Map<String, Value>) -> Option<(Option<u64>, bool)> {
    match claims.get("exp") {
        None | Some(Value::Null) => Some((None, true)),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(e) => Some((Some(e), true)),
            None => {
                let f = n.as_f64().unwrap_or(0.0);
                // `as` saturates: huge values stay huge, negative ones become 0.
                Some((Some(f.floor().max(0.0) as u64), false))
            }
        },
        Some(_) => None,
    }
}

/// A refusal remembered by the negative cache.
struct Refused {
    token: Box<[u8]>,
    until: Instant,
    /// `None`: the endpoint failed (503); else why the token was refused (401).
    fail: Option<AuthFail>,
}

/// One introspection endpoint as a worker uses it.
pub struct Provider {
    /// Keep-alive connections to the endpoint (TLS for https URLs).
    pool: Pool,
    /// The URL's path and host (the `host` header, and the name in logs).
    path: String,
    host: String,
    /// Header lines of every call, credentials included (holds the client secret: never
    /// logged).
    extra: String,
    timeout: Duration,
    max_concurrent: usize,
    in_flight: Cell<usize>,
    /// The last call got no usable answer (see [`Provider::unusable`]).
    failing: Cell<bool>,
    pub max_ttl: u64,
    pub forward: Vec<(String, Box<[u8]>)>,
    pub consumer_claim: String,
    /// Negative cache: tokens the endpoint refused, or could not judge, lately.
    negative_ttl: Duration,
    negative: RefCell<quick_cache::unsync::Cache<u64, Refused>>,
    hasher: std::collections::hash_map::RandomState,
}

/// Decrements the in-flight count however the call ends (cancelled included).
struct Slot<'a>(&'a Cell<usize>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Provider {
    pub fn new(
        cfg: &IntrospectionConfig,
        ep: &Endpoint,
        forward: Vec<(String, Box<[u8]>)>,
    ) -> Provider {
        use base64::Engine;
        let cred = format!(
            "{}:{}",
            form_encode(&cfg.client_id),
            form_encode(&cfg.client_secret.0)
        );
        Provider {
            pool: Pool::new(ep.target(), POOL_MAX_IDLE, POOL_IDLE_TIMEOUT),
            path: ep.url.path.clone(),
            extra: format!(
                "accept: application/json\r\nuser-agent: ringway\r\nauthorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(cred)
            ),
            host: ep.url.host.clone(),
            timeout: cfg.timeout.0,
            max_concurrent: cfg.max_concurrent,
            in_flight: Cell::new(0),
            failing: Cell::new(false),
            max_ttl: cfg.cache_max_ttl.0.as_secs().max(1),
            forward,
            consumer_claim: cfg.consumer_claim.clone(),
            negative_ttl: cfg.negative_cache_ttl.0,
            negative: RefCell::new(quick_cache::unsync::Cache::new(NEGATIVE_CACHE_ENTRIES)),
            hasher: Default::default(),
        }
    }

    fn key(&self, token: &[u8]) -> u64 {
        self.hasher.hash_one(token)
    }

    /// A refusal of `token` still in the negative cache: `Some(fail)` as [`Provider::call`]
    /// would return it.
    fn refused(&self, token: &[u8]) -> Option<Option<AuthFail>> {
        let key = self.key(token);
        let mut cache = self.negative.borrow_mut();
        let (fail, live) = match cache.get(&key) {
            Some(r) if &*r.token == token => (r.fail, r.until > Instant::now()),
            _ => return None,
        };
        if live {
            return Some(fail);
        }
        cache.remove(&key);
        None
    }

    /// Remembers a refusal of `token` for `negative_cache_ttl`, so that the same bad token
    /// sent again and again costs one call per period, not one per request.
    pub fn remember_refusal(&self, token: &[u8], fail: Option<AuthFail>) {
        let Some(until) = Instant::now().checked_add(self.negative_ttl) else {
            return;
        };
        self.negative.borrow_mut().insert(
            self.key(token),
            Refused {
                token: token.into(),
                until,
                fail,
            },
        );
    }

    /// Asks the endpoint about `token`. `Err(None)`: no usable answer (503).
    pub async fn call(&self, token: &str) -> Result<Answer, Option<AuthFail>> {
        if let Some(fail) = self.refused(token.as_bytes()) {
            return Err(fail);
        }
        if self.in_flight.get() >= self.max_concurrent {
            // Not the endpoint's answer: not remembered.
            return Err(None);
        }
        self.in_flight.set(self.in_flight.get().saturating_add(1));
        let _slot = Slot(&self.in_flight);
        let r = self.ask(token).await;
        if let Err(fail) = r {
            self.remember_refusal(token.as_bytes(), fail);
        }
        if !matches!(r, Err(None)) && self.failing.replace(false) {
            crate::info!("introspection: {}: answering again", self.host);
        }
        r
    }

    /// The endpoint gave no usable answer (`why`; the token gets 503): at debug level for
    /// each, and at warn level for the first after a usable one (per worker), so that an
    /// endpoint that stopped answering, or refuses the gateway's client credentials, shows in
    /// the default log without a line per request. Before, only at debug level: every token
    /// was 503 and the default log said nothing.
    #[cold]
    fn unusable(&self, why: std::fmt::Arguments<'_>) {
        if self.failing.replace(true) {
            debug!("introspection: {}: {why}", self.host);
        } else {
            crate::warn!(
                "introspection: {}: no usable answer ({why}): bearer tokens it judges get 503 until it answers; the next failures are logged at debug level",
                self.host
            );
        }
    }

    async fn ask(&self, token: &str) -> Result<Answer, Option<AuthFail>> {
        let form = format!("token={}&token_type_hint=access_token", form_encode(token));
        let req = client::request(
            "POST",
            &self.path,
            &self.host,
            &self.extra,
            Some(("application/x-www-form-urlencoded", form.as_bytes())),
            true,
        );
        // Introspection has no side effect (RFC 7662 §2.1): the pool may send it again on a
        // new connection when a kept one turns out closed.
        let resp = match self
            .pool
            .send(&req, false, MAX_ANSWER_BYTES, self.timeout)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.unusable(format_args!("{e}"));
                return Err(None);
            }
        };
        if resp.status() != 200 {
            self.unusable(format_args!("status {}", resp.status()));
            return Err(None);
        }
        let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(&resp.body) else {
            self.unusable(format_args!("the answer is not a JSON object"));
            return Err(None);
        };
        if claims.get("active") != Some(&Value::Bool(true)) {
            return Err(Some(AuthFail::Inactive));
        }
        let Some((exp, cacheable)) = answer_exp(&claims) else {
            self.unusable(format_args!("the answer's exp is not a number"));
            return Err(None);
        };
        let Some(nbf) = answer_nbf(&claims) else {
            self.unusable(format_args!("the answer's nbf or iat is not a number"));
            return Err(None);
        };
        Ok(Answer {
            claims,
            exp,
            cacheable,
            nbf,
        })
    }

    /// Idle keep-alive connections to the endpoint on this worker.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_forms() {
        let exp = |v: Value| {
            let mut m = Map::new();
            m.insert("exp".into(), v);
            answer_exp(&m)
        };
        assert_eq!(answer_exp(&Map::new()), Some((None, true)));
        assert_eq!(exp(Value::Null), Some((None, true)));
        assert_eq!(
            exp(serde_json::json!(1_700_000_000)),
            Some((Some(1_700_000_000), true))
        );
        assert_eq!(
            exp(serde_json::json!(1_700_000_000.9)),
            Some((Some(1_700_000_000), false))
        );
        assert_eq!(exp(serde_json::json!(-100)), Some((Some(0), false)));
        assert_eq!(exp(serde_json::json!(-0.5)), Some((Some(0), false)));
        assert_eq!(exp(serde_json::json!(1e300)), Some((Some(u64::MAX), false)));
        for bad in [
            serde_json::json!("1700000000"),
            serde_json::json!(true),
            serde_json::json!([1]),
            serde_json::json!({"at": 1}),
        ] {
            assert_eq!(exp(bad), None);
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b&c=d+é"), "a%20b%26c%3Dd%2B%C3%A9");
        assert_eq!(form_encode("tok-en._~"), "tok-en._~");
    }
}
