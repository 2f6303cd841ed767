//! TOML configuration: typed with serde, unknown keys refused, validated once at load.
//!
//! Every error names the file, the line and column, the key (as a path such as
//! `routes[2].upstream`) and the reason. Names are resolved here, never on the request path.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::http::request::{self, MAX_HEADERS_CAP};

/// A configuration error: where, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.reason)
        } else {
            write!(f, ": key `{}`: {}", self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Value types with their own parsing (errors from these carry toml's position for free).

/// A duration written as a string with a unit: "250ms", "10s", "5m", "1h".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            de::Error::custom("expected a duration string such as \"10s\" or \"250ms\"")
        })?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number then ms, s, m or h"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m or h"
            ))
        }
    };
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be above zero"));
    }
    Ok(d)
}

/// A size in bytes: an integer, or a string with a unit ("16KiB", "10MiB", "1GiB", "512B").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("expected a byte size: an integer or a string such as \"16KiB\"")
        })? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s).map(ByteSize).map_err(de::Error::custom),
        }
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unit must be B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A socket address, resolved when the config loads (a name such as "localhost:9000" becomes
/// its first address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub text: String,
    pub addr: SocketAddr,
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let addr = resolve(&text).map_err(de::Error::custom)?;
        Ok(Addr { text, addr })
    }
}

fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !text.contains(':') {
        return Err(format!("address {text:?} has no port (expected host:port)"));
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// An HTTP header name: a token, stored lower case.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeaderName(pub String);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        check_header_name(&s).map_err(de::Error::custom)?;
        Ok(HeaderName(s.to_ascii_lowercase()))
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_header_name(s: &str) -> Result<(), String> {
    if s.is_empty() || !s.bytes().all(is_tchar) {
        return Err(format!("{s:?} is not a valid header name"));
    }
    Ok(())
}

fn check_header_value(s: &str) -> Result<(), String> {
    if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!("header value {s:?} contains CR, LF or NUL"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The configuration tree.

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub rate_limiting: RateLimitingConfig,
    /// Credential providers: API keys, JWT, OAuth2 introspection.
    #[serde(default)]
    pub auth: crate::auth::config::AuthConfig,
    /// Callers known by name: API keys (as hashes) and JWT subjects.
    #[serde(default)]
    pub consumers: Vec<crate::auth::config::ConsumerConfig>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    /// io_uring where the kernel allows it, epoll otherwise.
    #[default]
    Auto,
    /// io_uring; falls back to epoll (with a log line) where the kernel refuses it.
    IoUring,
    /// monoio's epoll ("legacy") driver.
    Epoll,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Worker threads, one event loop each; 0 means one per available CPU.
    #[serde(default)]
    pub workers: usize,
    #[serde(default)]
    pub driver: DriverChoice,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown")]
    pub shutdown_timeout: Dur,
    /// The pseudonym added to `Via` headers.
    #[serde(default = "default_via")]
    pub via: String,
}

fn default_shutdown() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_via() -> String {
    "ringway".into()
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: 0,
            driver: DriverChoice::Auto,
            shutdown_timeout: default_shutdown(),
            via: default_via(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "d_head")]
    pub max_head_bytes: ByteSize,
    #[serde(default = "d_headers")]
    pub max_headers: usize,
    #[serde(default = "d_uri")]
    pub max_uri_bytes: ByteSize,
    #[serde(default = "d_body")]
    pub max_body_bytes: ByteSize,
}
fn d_head() -> ByteSize {
    ByteSize(request::DEFAULT_MAX_HEAD_BYTES as u64)
}
fn d_headers() -> usize {
    request::DEFAULT_MAX_HEADERS
}
fn d_uri() -> ByteSize {
    ByteSize(request::DEFAULT_MAX_URI_BYTES as u64)
}
fn d_body() -> ByteSize {
    ByteSize(request::DEFAULT_MAX_BODY_BYTES)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_head_bytes: d_head(),
            max_headers: d_headers(),
            max_uri_bytes: d_uri(),
            max_body_bytes: d_body(),
        }
    }
}

impl LimitsConfig {
    pub fn to_limits(&self) -> request::Limits {
        request::Limits {
            max_head_bytes: self.max_head_bytes.0 as usize,
            max_headers: self.max_headers,
            max_uri_bytes: self.max_uri_bytes.0 as usize,
            max_body_bytes: self.max_body_bytes.0,
            ..request::Limits::default()
        }
    }
}

macro_rules! dur_default {
    ($name:ident, $ms:expr) => {
        fn $name() -> Dur {
            Dur(Duration::from_millis($ms))
        }
    };
}
dur_default!(d_client_head, 10_000);
dur_default!(d_client_idle, 60_000);
dur_default!(d_client_body, 30_000);
dur_default!(d_client_write, 60_000);
dur_default!(d_up_connect, 3_000);
dur_default!(d_up_response, 30_000);
dur_default!(d_up_body, 30_000);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// From a request's first byte until its head is complete (slowloris guard): 408.
    #[serde(default = "d_client_head")]
    pub client_head: Dur,
    /// A keep-alive connection waiting for its next request; closed silently after it.
    #[serde(default = "d_client_idle")]
    pub client_idle: Dur,
    /// Longest pause between two reads of a request body: 408.
    #[serde(default = "d_client_body")]
    pub client_body: Dur,
    /// Longest wait for the client to accept response bytes; the connection is closed after it.
    #[serde(default = "d_client_write")]
    pub client_write: Dur,
    /// TCP connect to an upstream endpoint: 504.
    #[serde(default = "d_up_connect")]
    pub upstream_connect: Dur,
    /// From the request being sent until the upstream's response head: 504.
    #[serde(default = "d_up_response")]
    pub upstream_response: Dur,
    /// Longest pause between two reads of an upstream response body: the response is cut.
    #[serde(default = "d_up_body")]
    pub upstream_body: Dur,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            client_head: d_client_head(),
            client_idle: d_client_idle(),
            client_body: d_client_body(),
            client_write: d_client_write(),
            upstream_connect: d_up_connect(),
            upstream_response: d_up_response(),
            upstream_body: d_up_body(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub address: Addr,
    #[serde(default = "d_backlog")]
    pub backlog: u32,
    /// TLS termination on this listener.
    #[serde(default)]
    pub tls: Option<ListenerTlsConfig>,
    /// Answer every request on this (plain) listener with a 308 to the same URL over https.
    #[serde(default)]
    pub redirect_https: Option<RedirectHttpsConfig>,
    /// Accept TRACE requests (and forward them). Off: TRACE gets a 405, as in nginx.
    #[serde(default)]
    pub allow_trace: bool,
    /// Keep request header lines whose name holds `_`. Off: they are dropped before routing,
    /// auth and forwarding, as nginx's `underscores_in_headers off` does.
    #[serde(default)]
    pub allow_underscores_in_headers: bool,
}
fn d_backlog() -> u32 {
    1024
}

impl ListenerConfig {
    /// The request-parsing limits for this listener: the global `[limits]` with the
    /// listener's own switches.
    pub fn request_limits(&self, global: request::Limits) -> request::Limits {
        request::Limits {
            allow_trace: self.allow_trace,
            allow_underscores_in_headers: self.allow_underscores_in_headers,
            ..global
        }
    }
}

/// TLS on a listener: certificates chosen by SNI, versions, resumption, client certificates.
/// Files are PEM, read when the config loads (paths relative to the working directory).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Chain + key pairs. The first is the default (no SNI, or no name matches).
    pub certificates: Vec<CertKeyConfig>,
    /// Lowest protocol version accepted: "1.2" (default) or "1.3".
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Sessions kept for resumption by session id (TLS 1.2), shared by the workers; 0 turns
    /// the cache off (tickets still resume).
    #[serde(default = "d_session_cache")]
    pub session_cache: usize,
    /// Stateless resumption tickets (keys rotated every 6 hours, never written to disk).
    #[serde(default = "d_true")]
    pub session_tickets: bool,
    /// Client certificates (mTLS).
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
}
fn d_session_cache() -> usize {
    4096
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertKeyConfig {
    /// The certificate chain, leaf first.
    pub cert: String,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// The handshake fails without a certificate from one of the CAs.
    #[default]
    Required,
    /// A certificate is verified when sent; routes decide with `require_client_cert`.
    Optional,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// CA bundle (PEM) that client certificates must chain to.
    pub ca: String,
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Header that carries the verified certificate's subject upstream. A copy sent by the
    /// client is always removed.
    #[serde(default = "d_subject_header")]
    pub subject_header: HeaderName,
}
fn d_subject_header() -> HeaderName {
    HeaderName("x-client-cert-subject".into())
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectHttpsConfig {
    /// Port in the Location URL; absent or 443: none written.
    #[serde(default)]
    pub port: Option<u16>,
}

/// TLS to an upstream group's endpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA bundle (PEM) that the endpoints' certificates must chain to; absent: the Mozilla
    /// roots built into ringway (webpki-roots).
    #[serde(default)]
    pub ca: Option<String>,
    /// Name sent as SNI and verified in the certificate; default: the endpoint's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// Client certificate chain and key presented to the endpoints.
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
    /// `false` accepts any certificate (testing only: it gives up on authentication).
    #[serde(default = "d_true")]
    pub verify: bool,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    /// Fewest requests in flight (this worker's view), weighted.
    LeastRequest,
    /// Power of two random choices on peak-EWMA latency × (in-flight + 1).
    PeakEwma,
    /// Maglev consistent hashing on `hash_on`.
    ConsistentHash,
}

/// What consistent hashing hashes: "client_ip", "header:NAME" or "cookie:NAME".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    ClientIp,
    Header(String),
    Cookie(String),
}

impl<'de> Deserialize<'de> for HashOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        if let Some(h) = s.strip_prefix("header:") {
            check_header_name(h).map_err(de::Error::custom)?;
            return Ok(HashOn::Header(h.to_ascii_lowercase()));
        }
        if let Some(c) = s.strip_prefix("cookie:") {
            if c.is_empty() || !c.bytes().all(is_tchar) {
                return Err(de::Error::custom(format!("{c:?} is not a cookie name")));
            }
            return Ok(HashOn::Cookie(c.to_string()));
        }
        Err(de::Error::custom(format!(
            "{s:?}: expected \"client_ip\", \"header:NAME\" or \"cookie:NAME\""
        )))
    }
}

/// Active HTTP health checks, run once per gateway (not per worker).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "d_hc_path")]
    pub path: String,
    /// Host header of the check; default: the endpoint's address.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "d_hc_interval")]
    pub interval: Dur,
    #[serde(default = "d_hc_timeout")]
    pub timeout: Dur,
    /// Consecutive passing checks that bring an endpoint back.
    #[serde(default = "d_two")]
    pub healthy_threshold: u32,
    /// Consecutive failing checks that take an endpoint out.
    #[serde(default = "d_three")]
    pub unhealthy_threshold: u32,
    /// Statuses that pass; default 200-399.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
}
fn d_hc_path() -> String {
    "/".into()
}
dur_default!(d_hc_interval, 2_000);
dur_default!(d_hc_timeout, 1_000);
fn d_two() -> u32 {
    2
}
fn d_three() -> u32 {
    3
}

/// Passive outlier detection: endpoints that keep failing are ejected for a while.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive failures (connect errors, resets, timeouts, 5xx) seen by one worker that
    /// eject an endpoint; 0 turns outlier detection off.
    #[serde(default = "d_five")]
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each further ejection, up to `max_ejection_time`.
    #[serde(default = "d_base_ejection")]
    pub base_ejection_time: Dur,
    #[serde(default = "d_max_ejection")]
    pub max_ejection_time: Dur,
    /// Most endpoints of the group ejected at once, in percent (at least one stays).
    #[serde(default = "d_fifty")]
    pub max_ejection_percent: u32,
}
fn d_five() -> u32 {
    5
}
dur_default!(d_base_ejection, 5_000);
dur_default!(d_max_ejection, 300_000);
fn d_fifty() -> u32 {
    50
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: d_five(),
            base_ejection_time: d_base_ejection(),
            max_ejection_time: d_max_ejection(),
            max_ejection_percent: d_fifty(),
        }
    }
}

/// Circuit breaker of an upstream group. Limits count per worker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Open upstream connections (pooled and in use).
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection when `max_connections` is reached.
    #[serde(default)]
    pub max_pending: Option<u32>,
    /// Requests in flight.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Failure ratio (0..1) over `window` that opens the breaker.
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// Requests the window needs before `error_rate` is judged.
    #[serde(default = "d_min_requests")]
    pub min_requests: u32,
    #[serde(default = "d_window")]
    pub window: Dur,
    /// Time spent open before letting probes through (half-open).
    #[serde(default = "d_open_for")]
    pub open_for: Dur,
    /// Probe requests allowed while half-open; all must succeed to close.
    #[serde(default = "d_three")]
    pub half_open_probes: u32,
}
fn d_min_requests() -> u32 {
    20
}
dur_default!(d_window, 10_000);
dur_default!(d_open_for, 5_000);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default)]
    pub balance: Balance,
    /// Idle keep-alive connections kept per endpoint, per worker.
    #[serde(default = "d_max_idle")]
    pub max_idle: usize,
    /// An idle pooled connection older than this is closed.
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout: Dur,
    /// Key for `balance = "consistent_hash"` (default: client_ip).
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
    /// TLS to the endpoints.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
}
fn d_max_idle() -> usize {
    64
}
dur_default!(d_idle_timeout, 30_000);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: Addr,
    #[serde(default = "d_weight")]
    pub weight: u32,
}
fn d_weight() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Appended (a second line if the header exists).
    #[serde(default)]
    pub add: BTreeMap<HeaderName, String>,
    /// Replaces every existing line of the header.
    #[serde(default)]
    pub set: BTreeMap<HeaderName, String>,
    /// Removed.
    #[serde(default)]
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectConfig {
    #[serde(default = "d_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<HeaderName, String>,
}
fn d_status() -> u16 {
    200
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Host names: exact ("api.example.com") or a suffix wildcard ("*.example.com").
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_regex: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<HeaderName, String>,
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub direct: Option<DirectConfig>,
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub replace_prefix: Option<String>,
    #[serde(default = "d_true")]
    pub preserve_host: bool,
    #[serde(default)]
    pub set_host: Option<String>,
    #[serde(default)]
    pub request_headers: HeaderOps,
    #[serde(default)]
    pub response_headers: HeaderOps,
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Per-route overrides of the global timeouts.
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    /// Token-bucket limits; a request must pass all of them.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Most requests of this route in flight at once, gateway-wide (per key).
    #[serde(default)]
    pub concurrency: Option<ConcurrencyConfig>,
    /// Request quotas per calendar day or month (UTC); kept in Redis with that backend.
    #[serde(default)]
    pub quotas: Vec<QuotaConfig>,
    /// Only requests with a verified client certificate (mTLS) pass; others get a 403.
    #[serde(default)]
    pub require_client_cert: bool,
    /// Who may call this route: "none", "api_key", a provider name, or a table with `any_of`
    /// and scopes/roles (see `crate::auth`).
    #[serde(default)]
    pub auth: Option<crate::auth::config::RouteAuth>,
    /// Trailer fields of chunked request bodies: "drop" (default) or "forward" (only the
    /// fields RFC 9110 §6.5.1 allows in a trailer).
    #[serde(default)]
    pub trailers: TrailersConfig,
}

/// What a route does with the trailer fields of a chunked request body.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrailersConfig {
    /// None is forwarded.
    #[default]
    Drop,
    /// Forwarded, less the fields that may not appear in a trailer and hop-by-hop ones.
    Forward,
}

impl TrailersConfig {
    pub fn policy(self) -> crate::http::chunked::TrailerPolicy {
        match self {
            TrailersConfig::Drop => crate::http::chunked::TrailerPolicy::Drop,
            TrailersConfig::Forward => crate::http::chunked::TrailerPolicy::Filter,
        }
    }
}

/// A quota: at most `limit` requests per key per calendar period.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Policy name in the RateLimit headers; default: the period ("day", "month").
    #[serde(default)]
    pub name: Option<String>,
    pub key: RateKey,
    pub limit: u32,
    pub period: QuotaPeriod,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    Day,
    Month,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    pub max: u32,
    #[serde(default = "d_route_key")]
    pub key: RateKey,
}
fn d_route_key() -> RateKey {
    RateKey::Route
}

/// What a rate limit counts by: "client_ip", "route" or "header:NAME".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    Route,
    Header(String),
    /// The consumer the route's auth policy identified (client address when there is none).
    Consumer,
    /// A claim of the verified token (client address when the token has no such claim).
    Claim(String),
}

impl RateKey {
    /// Keys that need an authenticated caller.
    pub fn needs_auth(&self) -> bool {
        matches!(self, RateKey::Consumer | RateKey::Claim(_))
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "client_ip" => Ok(RateKey::ClientIp),
            "route" => Ok(RateKey::Route),
            "consumer" => Ok(RateKey::Consumer),
            _ => {
                if let Some(h) = s.strip_prefix("header:") {
                    check_header_name(h).map_err(de::Error::custom)?;
                    Ok(RateKey::Header(h.to_ascii_lowercase()))
                } else if let Some(c) = s.strip_prefix("claim:").filter(|c| !c.is_empty()) {
                    Ok(RateKey::Claim(c.to_string()))
                } else {
                    Err(de::Error::custom(format!(
                        "{s:?}: expected \"client_ip\", \"route\", \"consumer\", \"header:NAME\" or \"claim:NAME\""
                    )))
                }
            }
        }
    }
}

/// Most rate limits one route may carry.
pub const MAX_RATE_LIMITS_PER_ROUTE: usize = 8;

/// A token bucket: `rate` requests per `per`, bursts up to `burst`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Policy name in the RateLimit headers; default: the key.
    #[serde(default)]
    pub name: Option<String>,
    pub key: RateKey,
    pub rate: u32,
    #[serde(default = "d_per")]
    pub per: Dur,
    /// Bucket size; default: `rate`.
    #[serde(default)]
    pub burst: Option<u32>,
}
dur_default!(d_per, 1_000);

/// Host-wide rate-limiting settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitingConfig {
    /// Keys (per limit) kept in memory; the least recently used are evicted beyond it.
    #[serde(default = "d_max_keys")]
    pub max_keys: usize,
    /// Where the buckets live: "local" (this host) or "redis" (shared by every gateway
    /// pointed at the same Redis).
    #[serde(default)]
    pub backend: RateBackend,
    /// Required with `backend = "redis"`.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
}
fn d_max_keys() -> usize {
    100_000
}

impl Default for RateLimitingConfig {
    fn default() -> Self {
        RateLimitingConfig {
            max_keys: d_max_keys(),
            backend: RateBackend::Local,
            redis: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateBackend {
    #[default]
    Local,
    Redis,
}

/// What a gateway does while Redis cannot be reached.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailure {
    /// Fail open: every host applies the limits on its own local buckets.
    #[default]
    Local,
    /// Fail closed: requests on limited routes get 503 until Redis answers again.
    Deny,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `host:port` of the Redis server.
    pub address: Addr,
    /// Sent with AUTH after connecting, when set.
    #[serde(default)]
    pub password: Option<String>,
    /// Longest wait for one round trip (connect, or a pipeline of commands); a request waits
    /// at most this long for Redis before the failure policy applies.
    #[serde(default = "d_redis_timeout")]
    pub timeout: Dur,
    #[serde(default)]
    pub on_failure: RedisFailure,
    /// Prefix of every key ringway writes.
    #[serde(default = "d_redis_prefix")]
    pub key_prefix: String,
    /// How often an unreachable Redis is tried again.
    #[serde(default = "d_redis_retry")]
    pub retry_interval: Dur,
}
dur_default!(d_redis_timeout, 50);
dur_default!(d_redis_retry, 1_000);
fn d_redis_prefix() -> String {
    "ringway:".into()
}

/// When and how a route retries a failed upstream request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included.
    #[serde(default = "d_attempts")]
    pub attempts: u32,
    /// Conditions: "connect_failure", "reset", "timeout", "502", "503", "504".
    #[serde(default = "d_retry_on")]
    pub on: Vec<String>,
    /// Backoff before try n is random in [0, min(max, base × 2^(n-2))] (full jitter).
    #[serde(default = "d_backoff_base")]
    pub backoff_base: Dur,
    #[serde(default = "d_backoff_max")]
    pub backoff_max: Dur,
    /// Retries may add at most this percentage on top of the route's requests (per worker,
    /// over the last 10 s).
    #[serde(default = "d_budget")]
    pub budget_percent: u32,
    /// Retries always allowed per second, whatever the budget says.
    #[serde(default = "d_three")]
    pub min_retries_per_second: u32,
    /// Retry non-idempotent methods (POST, PATCH) on conditions other than connect_failure.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Request bodies up to this size are kept for replay; larger ones are streamed and
    /// never retried.
    #[serde(default = "d_replay")]
    pub max_replay_bytes: ByteSize,
}
fn d_attempts() -> u32 {
    2
}
fn d_retry_on() -> Vec<String> {
    vec!["connect_failure".into(), "reset".into(), "503".into()]
}
dur_default!(d_backoff_base, 25);
dur_default!(d_backoff_max, 250);
fn d_budget() -> u32 {
    20
}
fn d_replay() -> ByteSize {
    ByteSize(64 * 1024)
}

pub const RETRY_CONDITIONS: &[&str] = &["connect_failure", "reset", "timeout", "502", "503", "504"];

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    pub client_body: Option<Dur>,
    pub client_write: Option<Dur>,
    pub upstream_connect: Option<Dur>,
    pub upstream_response: Option<Dur>,
    pub upstream_body: Option<Dur>,
}
fn d_true() -> bool {
    true
}

// ---------------------------------------------------------------------------------------------
// Loading.

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let label = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: label.clone(),
            line: None,
            column: None,
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&src, &label)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(src);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = match inner.span() {
                Some(span) => {
                    let (l, c) = line_col(src, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ConfigError {
                file: file.to_string(),
                line,
                column,
                key: if key == "." { String::new() } else { key },
                reason: inner.message().trim().to_string(),
            }
        })?;
        cfg.validate(src, file)?;
        Ok(cfg)
    }

    fn validate(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let err = |key: String, span: Option<std::ops::Range<usize>>, reason: String| {
            let (line, column) = match span {
                Some(s) => {
                    let (l, c) = line_col(src, s.start);
                    (Some(l), Some(c))
                }
                None => locate_key(src, &key),
            };
            ConfigError {
                file: file.to_string(),
                line,
                column,
                key,
                reason,
            }
        };
        if self.listeners.is_empty() {
            return Err(err(
                "listeners".into(),
                None,
                "at least one [[listeners]] is required".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.address.addr.port() != 0 && !seen.insert(l.address.addr) {
                return Err(err(
                    format!("listeners[{i}].address"),
                    None,
                    format!("{} is configured twice", l.address.addr),
                ));
            }
            if l.backlog == 0 {
                return Err(err(
                    format!("listeners[{i}].backlog"),
                    None,
                    "must be above 0".into(),
                ));
            }
            if let Some(t) = &l.tls {
                if l.redirect_https.is_some() {
                    return Err(err(
                        format!("listeners[{i}].redirect_https"),
                        None,
                        "a TLS listener does not redirect to https".into(),
                    ));
                }
                crate::tls::server_config(t, &format!("listeners[{i}].tls"))
                    .map_err(|e| err(e.key, None, e.reason))?;
            }
            if l.redirect_https.as_ref().and_then(|r| r.port) == Some(0) {
                return Err(err(
                    format!("listeners[{i}].redirect_https.port"),
                    None,
                    "must be above 0".into(),
                ));
            }
        }
        if self.routes.iter().any(|r| r.require_client_cert)
            && !self
                .listeners
                .iter()
                .any(|l| l.tls.as_ref().is_some_and(|t| t.client_auth.is_some()))
        {
            let i = self
                .routes
                .iter()
                .position(|r| r.require_client_cert)
                .unwrap_or(0);
            return Err(err(
                format!("routes[{i}].require_client_cert"),
                None,
                "no listener has tls.client_auth, so no request could pass".into(),
            ));
        }
        if self.rate_limiting.max_keys == 0 {
            return Err(err(
                "rate_limiting.max_keys".into(),
                None,
                "must be above 0".into(),
            ));
        }
        match (&self.rate_limiting.backend, &self.rate_limiting.redis) {
            (RateBackend::Redis, None) => {
                return Err(err(
                    "rate_limiting.redis".into(),
                    None,
                    "backend = \"redis\" needs a [rate_limiting.redis] table with an address"
                        .into(),
                ))
            }
            (_, Some(r)) if r.timeout.0.is_zero() => {
                return Err(err(
                    "rate_limiting.redis.timeout".into(),
                    None,
                    "must be above 0".into(),
                ))
            }
            _ => {}
        }
        let l = &self.limits;
        if l.max_headers == 0 || l.max_headers > MAX_HEADERS_CAP {
            return Err(err(
                "limits.max_headers".into(),
                None,
                format!("must be between 1 and {MAX_HEADERS_CAP}"),
            ));
        }
        if l.max_head_bytes.0 < 256 || l.max_head_bytes.0 > 1 << 20 {
            return Err(err(
                "limits.max_head_bytes".into(),
                None,
                "must be between 256 bytes and 1MiB".into(),
            ));
        }
        if l.max_uri_bytes.0 == 0 || l.max_uri_bytes.0 > l.max_head_bytes.0 {
            return Err(err(
                "limits.max_uri_bytes".into(),
                None,
                "must be above 0 and at most limits.max_head_bytes".into(),
            ));
        }
        for (name, u) in &self.upstreams {
            if u.endpoints.is_empty() {
                return Err(err(
                    format!("upstreams.{name}.endpoints"),
                    None,
                    "needs at least one endpoint".into(),
                ));
            }
            if let Some(hc) = &u.health_check {
                if !hc.path.starts_with('/') {
                    return Err(err(
                        format!("upstreams.{name}.health_check.path"),
                        None,
                        "must start with '/'".into(),
                    ));
                }
                if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
                    return Err(err(
                        format!("upstreams.{name}.health_check"),
                        None,
                        "thresholds must be at least 1".into(),
                    ));
                }
                if hc
                    .expected_statuses
                    .iter()
                    .any(|s| !(100..=599).contains(s))
                {
                    return Err(err(
                        format!("upstreams.{name}.health_check.expected_statuses"),
                        None,
                        "statuses are 100..599".into(),
                    ));
                }
            }
            if u.outlier.max_ejection_percent > 100 {
                return Err(err(
                    format!("upstreams.{name}.outlier.max_ejection_percent"),
                    None,
                    "must be 0..100".into(),
                ));
            }
            if let Some(b) = &u.circuit_breaker {
                if let Some(r) = b.error_rate {
                    if !(r > 0.0 && r <= 1.0) {
                        return Err(err(
                            format!("upstreams.{name}.circuit_breaker.error_rate"),
                            None,
                            "must be in (0, 1]".into(),
                        ));
                    }
                }
                if b.half_open_probes == 0 {
                    return Err(err(
                        format!("upstreams.{name}.circuit_breaker.half_open_probes"),
                        None,
                        "must be at least 1".into(),
                    ));
                }
            }
            if u.hash_on.is_some() && u.balance != Balance::ConsistentHash {
                return Err(err(
                    format!("upstreams.{name}.hash_on"),
                    None,
                    "only used with balance = \"consistent_hash\"".into(),
                ));
            }
            if let Some(t) = &u.tls {
                crate::tls::client_config(t, &format!("upstreams.{name}.tls"))
                    .map_err(|e| err(e.key, None, e.reason))?;
            }
            for (j, e) in u.endpoints.iter().enumerate() {
                if e.weight == 0 || e.weight > 1000 {
                    return Err(err(
                        format!("upstreams.{name}.endpoints[{j}].weight"),
                        None,
                        "must be between 1 and 1000".into(),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let k = |f: &str| format!("routes[{i}].{f}");
            if let Some(n) = &r.name {
                if !names.insert(n.clone()) {
                    return Err(err(
                        k("name"),
                        None,
                        format!("route name {n:?} is used twice"),
                    ));
                }
            }
            match (&r.upstream, &r.direct) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        k("direct"),
                        None,
                        "a route has either `upstream` or `direct`, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(err(
                        format!("routes[{i}]"),
                        None,
                        "a route needs `upstream` or `direct`".into(),
                    ))
                }
                (Some(u), None) => {
                    if !self.upstreams.contains_key(u.get_ref()) {
                        return Err(err(
                            k("upstream"),
                            Some(u.span()),
                            format!(
                                "no upstream named {:?} (defined: {:?})",
                                u.get_ref(),
                                self.upstreams.keys().collect::<Vec<_>>()
                            ),
                        ));
                    }
                }
                (None, Some(d)) => {
                    if !(200..=599).contains(&d.status) {
                        return Err(err(
                            k("direct.status"),
                            None,
                            "must be between 200 and 599".into(),
                        ));
                    }
                    for v in d.headers.values() {
                        check_header_value(v).map_err(|e| err(k("direct.headers"), None, e))?;
                    }
                }
            }
            let kinds = [
                r.path.is_some(),
                r.path_prefix.is_some(),
                r.path_regex.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if kinds > 1 {
                return Err(err(
                    k("path"),
                    None,
                    "use one of `path`, `path_prefix` and `path_regex`".into(),
                ));
            }
            for (f, p) in [
                ("path", &r.path),
                ("path_prefix", &r.path_prefix),
                ("strip_prefix", &r.strip_prefix),
            ] {
                if let Some(p) = p {
                    if !p.starts_with('/') {
                        return Err(err(k(f), None, format!("{p:?} must start with '/'")));
                    }
                }
            }
            if let Some(re) = &r.path_regex {
                regex::bytes::Regex::new(re)
                    .map_err(|e| err(k("path_regex"), None, format!("invalid regex: {e}")))?;
            }
            if r.replace_prefix.is_some() {
                if r.path_prefix.is_none() {
                    return Err(err(
                        k("replace_prefix"),
                        None,
                        "needs `path_prefix` (the part it replaces)".into(),
                    ));
                }
                if r.strip_prefix.is_some() {
                    return Err(err(
                        k("replace_prefix"),
                        None,
                        "use `strip_prefix` or `replace_prefix`, not both".into(),
                    ));
                }
            }
            for (j, h) in r.hosts.iter().enumerate() {
                let bare = h.strip_prefix("*.").unwrap_or(h);
                if bare.is_empty()
                    || bare.contains('*')
                    || bare.bytes().any(|b| b.is_ascii_whitespace() || b == b'/')
                {
                    return Err(err(
                        format!("routes[{i}].hosts[{j}]"),
                        None,
                        format!("{h:?} is not a host name or *.suffix wildcard"),
                    ));
                }
                if !bare.starts_with('[') && bare.contains(':') {
                    return Err(err(
                        format!("routes[{i}].hosts[{j}]"),
                        None,
                        format!("{h:?}: hosts are matched without the port; drop \":port\""),
                    ));
                }
            }
            for (j, m) in r.methods.iter().enumerate() {
                if m.is_empty()
                    || !m
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
                {
                    return Err(err(
                        format!("routes[{i}].methods[{j}]"),
                        None,
                        format!("{m:?} is not an upper-case method name"),
                    ));
                }
            }
            for (f, ops) in [
                ("request_headers", &r.request_headers),
                ("response_headers", &r.response_headers),
            ] {
                for v in ops.add.values().chain(ops.set.values()) {
                    check_header_value(v).map_err(|e| err(k(f), None, e))?;
                }
            }
            if let Some(rt) = &r.retry {
                if rt.attempts == 0 || rt.attempts > 10 {
                    return Err(err(
                        k("retry.attempts"),
                        None,
                        "must be between 1 and 10".into(),
                    ));
                }
                for c in &rt.on {
                    if !RETRY_CONDITIONS.contains(&c.as_str()) {
                        return Err(err(
                            k("retry.on"),
                            None,
                            format!("unknown condition {c:?} (known: {RETRY_CONDITIONS:?})"),
                        ));
                    }
                }
                if rt.backoff_max.0 < rt.backoff_base.0 {
                    return Err(err(
                        k("retry.backoff_max"),
                        None,
                        "must be at least backoff_base".into(),
                    ));
                }
            }
            if r.concurrency.as_ref().is_some_and(|c| c.max == 0) {
                return Err(err(k("concurrency.max"), None, "must be above 0".into()));
            }
            if r.rate_limits.len() + r.quotas.len() > MAX_RATE_LIMITS_PER_ROUTE {
                return Err(err(
                    k("rate_limits"),
                    None,
                    format!("at most {MAX_RATE_LIMITS_PER_ROUTE} rate limits and quotas per route"),
                ));
            }
            for (j, q) in r.quotas.iter().enumerate() {
                if q.limit == 0 {
                    return Err(err(
                        format!("routes[{i}].quotas[{j}].limit"),
                        None,
                        "must be above 0".into(),
                    ));
                }
                if let Some(n) = &q.name {
                    if n.is_empty() || !n.bytes().all(is_tchar) {
                        return Err(err(
                            format!("routes[{i}].quotas[{j}].name"),
                            None,
                            format!("{n:?}: use letters, digits and -._ (it goes into RateLimit headers)"),
                        ));
                    }
                }
            }
            for (j, l) in r.rate_limits.iter().enumerate() {
                if let Some(n) = &l.name {
                    if n.is_empty() || !n.bytes().all(is_tchar) {
                        return Err(err(
                            format!("routes[{i}].rate_limits[{j}].name"),
                            None,
                            format!("{n:?}: use letters, digits and -._ (it goes into RateLimit headers)"),
                        ));
                    }
                }
                if l.rate == 0 {
                    return Err(err(
                        format!("routes[{i}].rate_limits[{j}].rate"),
                        None,
                        "must be above 0".into(),
                    ));
                }
                if l.burst == Some(0) {
                    return Err(err(
                        format!("routes[{i}].rate_limits[{j}].burst"),
                        None,
                        "must be above 0".into(),
                    ));
                }
            }
            let has_auth = r.auth.as_ref().is_some_and(|a| !a.any_of.is_empty());
            let keyed = r
                .rate_limits
                .iter()
                .enumerate()
                .map(|(j, l)| (format!("rate_limits[{j}].key"), &l.key))
                .chain(
                    r.quotas
                        .iter()
                        .enumerate()
                        .map(|(j, q)| (format!("quotas[{j}].key"), &q.key)),
                );
            for (name, key) in keyed {
                if key.needs_auth() && !has_auth {
                    return Err(err(
                        k(&name),
                        None,
                        "a consumer or claim key needs an auth policy on the route (`auth = ...`)"
                            .into(),
                    ));
                }
            }
            if let Some(h) = &r.set_host {
                check_header_value(h).map_err(|e| err(k("set_host"), None, e))?;
            }
        }
        if self
            .auth
            .realm
            .bytes()
            .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
        {
            return Err(err(
                "auth.realm".into(),
                None,
                "must not hold quotes, backslashes or control characters".into(),
            ));
        }
        let policies: Vec<_> = self.routes.iter().map(|r| r.auth.clone()).collect();
        crate::auth::config::validate(&self.auth, &self.consumers, &policies)
            .map_err(|(key, reason)| err(key, None, reason))?;
        Ok(())
    }

    /// Workers to run: the config's, else one per available CPU.
    pub fn worker_count(&self) -> usize {
        if self.server.workers > 0 {
            self.server.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|p| offset - p).unwrap_or(offset + 1);
    (line, col)
}

/// Best-effort position of a key path such as `routes[2].path_regex` for errors found after
/// deserialising: the line of the n-th `[[routes]]` table, then the first `name =` after it.
fn locate_key(src: &str, key: &str) -> (Option<usize>, Option<usize>) {
    let mut offset = 0usize;
    let parts: Vec<&str> = key.split('.').collect();
    let mut skip = 0;
    // A dotted table header such as `[auth.jwt.main]` covers several parts at once.
    for n in (2..=parts.len()).rev() {
        if parts[..n].iter().any(|p| p.contains('[')) {
            continue;
        }
        if let Some(p) = src.find(&format!("[{}]", parts[..n].join("."))) {
            offset = p;
            skip = n;
            break;
        }
    }
    for part in parts.into_iter().skip(skip) {
        let (name, idx) = match part.find('[') {
            Some(b) => (
                &part[..b],
                part[b + 1..part.len() - 1].parse::<usize>().ok(),
            ),
            None => (part, None),
        };
        let hay = &src[offset..];
        let found = match idx {
            Some(n) => {
                let header = format!("[[{name}]]");
                hay.match_indices(&header)
                    .nth(n)
                    .map(|(p, _)| p)
                    .or_else(|| find_key_line(hay, name))
            }
            None => find_key_line(hay, name),
        };
        match found {
            Some(p) => offset += p,
            // An inline table or array: the closest enclosing key found is the best position.
            None if offset > 0 => break,
            None => return (None, None),
        }
    }
    let (l, c) = line_col(src, offset);
    (Some(l), Some(c))
}

fn find_key_line(hay: &str, name: &str) -> Option<usize> {
    let mut pos = 0;
    for line in hay.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with(name) && t[name.len()..].trim_start().starts_with(['=', '.']) {
            return Some(pos + (line.len() - t.len()));
        }
        if t == format!("[{name}]").as_str() || t.starts_with(&format!("[{name}.")) {
            return Some(pos + (line.len() - t.len()));
        }
        pos += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
[[listeners]]
address = "127.0.0.1:0"

[upstreams.users]
endpoints = [{ address = "127.0.0.1:9001" }, { address = "localhost:9002", weight = 3 }]

[[routes]]
path_prefix = "/users"
upstream = "users"
"#;

    #[test]
    fn parses_minimal() {
        let c = Config::parse(OK, "t.toml").unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.upstreams["users"].endpoints[1].weight, 3);
        assert_eq!(c.timeouts.client_head.0, Duration::from_secs(10));
    }

    fn bad(src: &str) -> ConfigError {
        Config::parse(src, "bad.toml").unwrap_err()
    }

    #[test]
    fn unknown_key_is_refused_with_position() {
        let e = bad("[server]\nworkers = 2\nwrokers = 3\n");
        assert_eq!(e.file, "bad.toml");
        assert_eq!(e.line, Some(3));
        assert!(e.reason.contains("unknown field `wrokers`"), "{e}");
        assert_eq!(e.key, "server.wrokers");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = bad("[timeouts]\nclient_head = 5\n");
        assert_eq!(e.key, "timeouts.client_head");
        assert_eq!(e.line, Some(2));
        let e = bad("[timeouts]\nclient_head = \"5 parsecs\"\n");
        assert!(e.reason.contains("unit"), "{e}");
    }

    #[test]
    fn unknown_upstream_points_at_value() {
        let src = OK.replace("upstream = \"users\"", "upstream = \"nope\"");
        let e = bad(&src);
        assert_eq!(e.key, "routes[0].upstream");
        assert_eq!(e.line, Some(10));
        assert!(e.reason.contains("no upstream named \"nope\""), "{e}");
    }

    #[test]
    fn semantic_errors_locate_the_table() {
        let src = format!("{OK}\n[[routes]]\npath_regex = \"(\"\nupstream = \"users\"\n");
        let e = bad(&src);
        assert_eq!(e.key, "routes[1].path_regex");
        assert_eq!(e.line, Some(13));
        assert!(e.to_string().starts_with("bad.toml:13:"), "{e}");
    }

    #[test]
    fn refusals() {
        assert!(bad("").reason.contains("listeners"));
        let e = bad("[[listeners]]\naddress = \"nowhere\"\n");
        assert!(e.reason.contains("no port"), "{e}");
        let e = bad(&OK.replace("path_prefix = \"/users\"", "path_prefix = \"users\""));
        assert!(e.reason.contains("must start with"), "{e}");
        let e = bad(&format!("{OK}[limits]\nmax_headers = 1000\n"));
        assert_eq!(e.key, "limits.max_headers");
        let e = bad(&OK.replace("upstream = \"users\"", "upstream = \"users\"\nrate_limits = [{ name = \"a\\\"b\", key = \"route\", rate = 1 }]"));
        assert_eq!(e.key, "routes[0].rate_limits[0].name");
        let e = bad(&OK.replace(
            "upstream = \"users\"",
            "upstream = \"users\"\nrate_limits = [{ key = \"nobody\", rate = 1 }]",
        ));
        assert!(e.reason.contains("client_ip"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert!(parse_size("10XB").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
    }

    /// Keys of issue 10's front-end conformance: listener parse switches, route trailers.
    #[test]
    fn conformance_keys() {
        let c = Config::parse(OK, "t.toml").unwrap();
        let l = c.listeners[0].request_limits(c.limits.to_limits());
        assert!(!l.allow_trace && !l.allow_underscores_in_headers);
        assert_eq!(c.routes[0].trailers, TrailersConfig::Drop);
        let src = OK
            .replace(
                "address = \"127.0.0.1:0\"",
                "address = \"127.0.0.1:0\"\nallow_trace = true\nallow_underscores_in_headers = true",
            )
            .replace("upstream = \"users\"", "upstream = \"users\"\ntrailers = \"forward\"");
        let c = Config::parse(&src, "t.toml").unwrap();
        let l = c.listeners[0].request_limits(c.limits.to_limits());
        assert!(l.allow_trace && l.allow_underscores_in_headers);
        assert_eq!(l.max_headers, c.limits.max_headers);
        assert_eq!(
            c.routes[0].trailers.policy(),
            crate::http::chunked::TrailerPolicy::Filter
        );
        let e = bad(&OK.replace(
            "upstream = \"users\"",
            "upstream = \"users\"\ntrailers = \"keep\"",
        ));
        assert_eq!(e.key, "routes[0].trailers");
        assert_eq!(e.line, Some(11));
        assert!(e.reason.contains("unknown variant"), "{e}");
        let e = bad(&OK.replace(
            "address = \"127.0.0.1:0\"",
            "address = \"127.0.0.1:0\"\nallow_trace = \"yes\"",
        ));
        assert_eq!(e.key, "listeners[0].allow_trace");
        assert_eq!(e.line, Some(4));
    }
}
