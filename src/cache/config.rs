//! Cache configuration: the global `[cache]` table (budgets, coalescing, targeted field) and a
//! route's `cache = { ... }`. Validated with the rest of the config (errors name the key;
//! `crate::config` adds the file, line and column).

use serde::Deserialize;

use crate::config::{Addr, ByteSize, Dur, HeaderName};

/// Largest per-worker byte budget accepted (64 GiB).
pub const MAX_BUDGET: u64 = 64 << 30;
/// Largest object accepted in a store (1 GiB).
pub const MAX_OBJECT: u64 = 1 << 30;
/// Most variants (Vary) accepted per key.
pub const MAX_VARIANTS_CAP: usize = 256;
/// Most query parameters in an allowlist, and headers in a key.
pub const MAX_KEY_PARTS: usize = 32;

/// `[cache]`: what every cache route shares.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of responses (headers and bodies) one worker keeps; past it, the least useful
    /// objects are evicted.
    #[serde(default = "d_max_bytes")]
    pub max_bytes_per_worker: ByteSize,
    /// Largest response body stored; larger ones stream through without being held.
    #[serde(default = "d_max_object")]
    pub max_object_bytes: ByteSize,
    /// Bytes of response bodies one worker may hold while they arrive to be stored (their
    /// captures, outside `max_bytes_per_worker` until stored); a body that does not fit
    /// streams through unstored. `None`: `max_bytes_per_worker`.
    #[serde(default)]
    pub max_in_flight_bytes_per_worker: Option<ByteSize>,
    /// Most stored variants (Vary) of one URL; the oldest goes first.
    #[serde(default = "d_max_variants")]
    pub max_variants: usize,
    /// Longest a request waits for a concurrent fetch of the same key before it goes to the
    /// upstream itself.
    #[serde(default = "d_coalesce")]
    pub coalesce_timeout: Dur,
    /// Targeted cache-control fields (RFC 9213), most specific first: the first one present
    /// and valid replaces `Cache-Control` for this cache.
    #[serde(default = "d_targeted")]
    pub targeted_fields: Vec<HeaderName>,
    /// Name written in `Cache-Status` (RFC 9211).
    #[serde(default = "d_name")]
    pub name: String,
    /// A Redis shared by every worker and host, asked on a local miss.
    #[serde(default)]
    pub redis: Option<CacheRedisConfig>,
}

/// `[cache.redis]`: a shared layer behind the per-worker stores.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRedisConfig {
    pub address: Addr,
    #[serde(default)]
    pub password: Option<String>,
    /// Longest a local miss waits for Redis before going upstream (fail open), and the
    /// longest connect or pipeline round trip.
    #[serde(default = "d_redis_timeout")]
    pub timeout: Dur,
    /// Prefix of every key the cache writes.
    #[serde(default = "d_redis_prefix")]
    pub key_prefix: String,
    /// How often an unreachable Redis is tried again.
    #[serde(default = "d_redis_retry")]
    pub retry_interval: Dur,
    /// Largest stored response (headers and body) written to Redis.
    #[serde(default = "d_redis_max_entry")]
    pub max_entry_bytes: ByteSize,
    /// Most purges the purge log (`<key_prefix>purge-log`) keeps: a host whose listener falls
    /// further behind than this many purges purges everything it stores.
    #[serde(default = "d_redis_log_length")]
    pub purge_log_length: u64,
    /// How long after a purge's Redis side failed with the link up (an error answered, the
    /// queue full) the kept purges are first sent again; each try that fails again doubles
    /// the wait, up to `purge_retry_max`.
    #[serde(default = "d_redis_retry_first")]
    pub purge_retry_first: Dur,
    /// Longest wait between two tries of the kept purges while the link stays up; when not
    /// given, [`DEFAULT_PURGE_RETRY_MAX`], or `purge_retry_first` when that is longer
    /// ([`CacheRedisConfig::purge_retry_max`]).
    #[serde(default)]
    pub purge_retry_max: Option<Dur>,
}

impl CacheRedisConfig {
    /// The link settings, as the rate limiter's link takes them.
    pub fn link(&self) -> crate::config::RedisConfig {
        crate::config::RedisConfig {
            address: self.address.clone(),
            password: self.password.clone(),
            timeout: self.timeout,
            on_failure: crate::config::RedisFailure::Local,
            key_prefix: self.key_prefix.clone(),
            retry_interval: self.retry_interval,
        }
    }

    /// The longest wait between two tries of the kept purges: `purge_retry_max` as given, or
    /// else [`DEFAULT_PURGE_RETRY_MAX`], or `purge_retry_first` when that is longer. Before,
    /// the default was 30 s whatever `purge_retry_first` was, so that a `purge_retry_first`
    /// over 30 s given alone (within its documented 10 ms to 1 h) was refused at load, the
    /// error naming `purge_retry_max`, a key the file did not hold.
    pub fn purge_retry_max(&self) -> std::time::Duration {
        self.purge_retry_max.map_or_else(
            || DEFAULT_PURGE_RETRY_MAX.max(self.purge_retry_first.0),
            |d| d.0,
        )
    }
}

fn d_redis_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(20))
}
fn d_redis_prefix() -> String {
    "ringway:cache:".into()
}
fn d_redis_retry() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn d_redis_max_entry() -> ByteSize {
    ByteSize(1 << 20)
}
fn d_redis_log_length() -> u64 {
    1000
}
fn d_redis_retry_first() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
/// `[cache.redis] purge_retry_max` when not given (unless `purge_retry_first` is longer).
pub const DEFAULT_PURGE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Most purges `[cache.redis] purge_log_length` lets the purge log keep: a purge message is
/// at most 64 KiB, so Redis holds at most about 6 GiB of them.
pub const MAX_PURGE_LOG_LENGTH: u64 = 100_000;
/// Least `[cache.redis] purge_retry_first`: a shorter wait would send a failing Redis the
/// kept purges again and again.
pub const MIN_PURGE_RETRY: std::time::Duration = std::time::Duration::from_millis(10);
/// Most `[cache.redis] purge_retry_first` and `purge_retry_max`.
pub const MAX_PURGE_RETRY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The most bytes a second a link to Redis is taken to move, for [`CacheConfig::warnings`]:
/// 1 GiB/s, more than loopback moves (about 0.7 GiB/s measured: 1 MiB in 1.3 ms, 64 MiB in
/// 95 ms) and about what a 10 Gb/s network carries.
const FASTEST_REDIS_LINK: f64 = (1u64 << 30) as f64;

impl CacheConfig {
    /// `max_in_flight_bytes_per_worker`, or its default: `max_bytes_per_worker`.
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight_bytes_per_worker
            .map_or(self.max_bytes_per_worker.0, |b| b.0)
    }

    /// Settings that load but are likely a mistake (see `Config::warnings`): a
    /// `[cache.redis] max_entry_bytes` that no link moves within `timeout`. An entry is
    /// written in one round and read back in one reply, each within `timeout` (see
    /// `crate::redis`); one the link cannot move in that time fails alone, each time it is
    /// written or looked up, so entries past what [`FASTEST_REDIS_LINK`] moves in `timeout`
    /// are stored for nothing.
    pub fn warnings(&self) -> Vec<String> {
        let Some(r) = &self.redis else {
            return Vec::new();
        };
        let moved = r.timeout.0.as_secs_f64() * FASTEST_REDIS_LINK;
        if r.max_entry_bytes.0 as f64 <= moved {
            return Vec::new();
        }
        let mib = |b: f64| b / f64::from(1u32 << 20);
        vec![format!(
            "cache.redis.max_entry_bytes: {:.1} MiB cannot be moved within `timeout` ({} ms) \
             unless the link to Redis carries more than 1 GiB/s (loopback: about 0.7 GiB/s), \
             so entries over {:.1} MiB would be written and looked up in vain (each fails \
             alone); raise `timeout` or lower `max_entry_bytes`",
            mib(r.max_entry_bytes.0 as f64),
            r.timeout.0.as_millis(),
            mib(moved),
        )]
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes_per_worker: d_max_bytes(),
            max_object_bytes: d_max_object(),
            max_in_flight_bytes_per_worker: None,
            max_variants: d_max_variants(),
            coalesce_timeout: d_coalesce(),
            targeted_fields: d_targeted(),
            name: d_name(),
            redis: None,
        }
    }
}

fn d_max_bytes() -> ByteSize {
    ByteSize(64 << 20)
}
fn d_max_object() -> ByteSize {
    ByteSize(1 << 20)
}
fn d_max_variants() -> usize {
    8
}
fn d_coalesce() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn d_targeted() -> Vec<HeaderName> {
    vec![HeaderName("cdn-cache-control".into())]
}
fn d_name() -> String {
    "ringway".into()
}

/// Which query parameters are part of the key.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum QueryKey {
    /// "all" (as sent) or "none".
    Mode(String),
    /// Only these parameters, sorted.
    Only(Vec<String>),
}

impl Default for QueryKey {
    fn default() -> Self {
        QueryKey::Mode("all".into())
    }
}

/// `cache.key`: what makes two requests the same entry.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Leave the Host out (one entry for every host of the route).
    #[serde(default)]
    pub ignore_host: bool,
    #[serde(default)]
    pub query: QueryKey,
    /// Request header values added to the key.
    #[serde(default)]
    pub headers: Vec<HeaderName>,
    /// Key by consumer even when the response is `public` (auth routes only).
    #[serde(default)]
    pub consumer: bool,
}

/// What a cache route does with responses that set cookies.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SetCookieMode {
    /// Not stored (the default).
    #[default]
    Bypass,
    /// Stored without `Set-Cookie`.
    Strip,
    /// Stored with it.
    Store,
}

/// A route's `cache = { ... }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    #[serde(default = "d_true")]
    pub enabled: bool,
    #[serde(default)]
    pub key: KeyConfig,
    /// Responses with `Set-Cookie`: "bypass" (not stored), "strip" (stored without the
    /// cookie) or "store" (stored with it, replayed to every caller: only for cookies that
    /// are the same for everyone).
    #[serde(default)]
    pub set_cookie: SetCookieMode,
    /// Heuristic freshness (RFC 9111 §4.2.2) for responses without explicit expiry: 10% of
    /// the time since Last-Modified, at most `max_heuristic`.
    #[serde(default = "d_true")]
    pub heuristic: bool,
    #[serde(default = "d_max_heuristic")]
    pub max_heuristic: Dur,
    /// `stale-while-revalidate` for responses that do not give one (RFC 5861 §3).
    #[serde(default)]
    pub stale_while_revalidate: Option<Dur>,
    /// `stale-if-error` for responses that do not give one (RFC 5861 §4).
    #[serde(default)]
    pub stale_if_error: Option<Dur>,
    /// Overrides `[cache] max_object_bytes` for this route.
    #[serde(default)]
    pub max_object_bytes: Option<ByteSize>,
    /// Accept the `PURGE` method on this route: `true` for any caller that passes the
    /// route's auth policy (which it must have), or the names of the consumers that may.
    #[serde(default)]
    pub purge: PurgeRights,
}

/// Who may `PURGE` on a cache route (`routes[].cache.purge`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PurgeRights {
    /// `false` (the default): PURGE is not accepted; `true`: any caller the route's auth
    /// policy lets in.
    Flag(bool),
    /// Only these consumers (`[[consumers]]` names).
    Consumers(Vec<String>),
}

impl Default for PurgeRights {
    fn default() -> Self {
        PurgeRights::Flag(false)
    }
}

impl PurgeRights {
    /// PURGE is accepted on the route at all.
    pub fn enabled(&self) -> bool {
        !matches!(self, PurgeRights::Flag(false))
    }
}

fn d_true() -> bool {
    true
}
fn d_max_heuristic() -> Dur {
    Dur(std::time::Duration::from_secs(24 * 3600))
}

/// Checks `[cache]` and every route's `cache`; `Err((key, reason))`.
pub fn validate(cfg: &crate::config::Config) -> Result<(), (String, String)> {
    let c = &cfg.cache;
    if c.max_bytes_per_worker.0 == 0 || c.max_bytes_per_worker.0 > MAX_BUDGET {
        return Err((
            "cache.max_bytes_per_worker".into(),
            "must be between 1 byte and 64GiB".into(),
        ));
    }
    if c.max_object_bytes.0 == 0
        || c.max_object_bytes.0 > MAX_OBJECT
        || c.max_object_bytes.0 > c.max_bytes_per_worker.0
    {
        return Err((
            "cache.max_object_bytes".into(),
            "must be above 0, at most 1GiB and at most max_bytes_per_worker".into(),
        ));
    }
    if let Some(m) = c.max_in_flight_bytes_per_worker {
        if m.0 < c.max_object_bytes.0 || m.0 > MAX_BUDGET {
            return Err((
                "cache.max_in_flight_bytes_per_worker".into(),
                "must be at least max_object_bytes and at most 64GiB".into(),
            ));
        }
    }
    if c.max_variants == 0 || c.max_variants > MAX_VARIANTS_CAP {
        return Err((
            "cache.max_variants".into(),
            format!("must be between 1 and {MAX_VARIANTS_CAP}"),
        ));
    }
    if c.name.is_empty() || !c.name.bytes().all(crate::http::is_tchar) {
        return Err((
            "cache.name".into(),
            "must be a token (letters, digits, -._)".into(),
        ));
    }
    if let Some(r) = &c.redis {
        if r.max_entry_bytes.0 == 0 || r.max_entry_bytes.0 > MAX_OBJECT {
            return Err((
                "cache.redis.max_entry_bytes".into(),
                "must be above 0 and at most 1GiB".into(),
            ));
        }
        if r.key_prefix.len() > crate::config::MAX_KEY_PREFIX
            || !r.key_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err((
                "cache.redis.key_prefix".into(),
                "at most 128 visible ASCII characters".into(),
            ));
        }
        if r.purge_log_length == 0 || r.purge_log_length > MAX_PURGE_LOG_LENGTH {
            return Err((
                "cache.redis.purge_log_length".into(),
                format!("must be between 1 and {MAX_PURGE_LOG_LENGTH} purges"),
            ));
        }
        if r.purge_retry_first.0 < MIN_PURGE_RETRY || r.purge_retry_first.0 > MAX_PURGE_RETRY {
            return Err((
                "cache.redis.purge_retry_first".into(),
                "must be between 10ms and 1h".into(),
            ));
        }
        let max = r.purge_retry_max();
        if max < r.purge_retry_first.0 || max > MAX_PURGE_RETRY {
            return Err((
                "cache.redis.purge_retry_max".into(),
                format!(
                    "must be at least purge_retry_first ({:?}) and at most 1h",
                    r.purge_retry_first.0
                ),
            ));
        }
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        let Some(rc) = &r.cache else { continue };
        let k = |s: &str| format!("routes[{i}].cache.{s}");
        if r.upstream.is_none() {
            return Err((
                k("enabled"),
                "only a route with an upstream can cache".into(),
            ));
        }
        if let QueryKey::Mode(m) = &rc.key.query {
            if m != "all" && m != "none" {
                return Err((
                    k("key.query"),
                    format!("{m:?}: use \"all\", \"none\" or a list of parameter names"),
                ));
            }
        }
        if let QueryKey::Only(list) = &rc.key.query {
            if list.len() > MAX_KEY_PARTS || list.iter().any(|p| p.is_empty()) {
                return Err((
                    k("key.query"),
                    format!("at most {MAX_KEY_PARTS} non-empty parameter names"),
                ));
            }
        }
        if rc.key.headers.len() > MAX_KEY_PARTS {
            return Err((k("key.headers"), format!("at most {MAX_KEY_PARTS} headers")));
        }
        let has_auth = r.auth.as_ref().is_some_and(|a| !a.any_of.is_empty());
        if rc.key.consumer && !has_auth {
            return Err((
                k("key.consumer"),
                "keying by consumer needs an auth policy on the route (`auth = ...`)".into(),
            ));
        }
        if let PurgeRights::Consumers(names) = &rc.purge {
            if names.is_empty() {
                return Err((
                    k("purge"),
                    "an empty list lets no one purge: write `false`".into(),
                ));
            }
            if let Some(n) = names
                .iter()
                .find(|n| !cfg.consumers.iter().any(|c| &c.name == *n))
            {
                return Err((k("purge"), format!("no consumer named {n:?}")));
            }
        }
        if rc.purge.enabled() && !has_auth {
            return Err((
                k("purge"),
                "PURGE must be restricted: the route needs an auth policy (`auth = ...`)".into(),
            ));
        }
        if let Some(m) = rc.max_object_bytes {
            if m.0 == 0 || m.0 > c.max_bytes_per_worker.0 || m.0 > c.max_in_flight() {
                return Err((
                    k("max_object_bytes"),
                    "must be above 0 and at most cache.max_bytes_per_worker and \
                     cache.max_in_flight_bytes_per_worker"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}
