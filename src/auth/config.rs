//! The `[auth]` and `[[consumers]]` sections and the routes' `auth` policies, as typed config.
//!
//! Checked once at load (`validate`): key files are read and parsed here, so a missing PEM file
//! or a bad JWKS is a config error naming the key, never a surprise on the first request.
//! Secrets are never part of an error's text.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::config::{Dur, HeaderName};

/// A secret from the config: its `Debug` form is redacted, so a logged config never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `[auth]`: named credential providers and shared settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `realm` of the `WWW-Authenticate` challenges.
    #[serde(default = "d_realm")]
    pub realm: String,
    /// Verified tokens and introspection results kept per worker.
    #[serde(default = "d_cache_size")]
    pub cache_size: usize,
    /// Longest a verified token or an introspection result is reused without a new check.
    #[serde(default = "d_cache_ttl")]
    pub cache_max_ttl: Dur,
    /// Header carrying the consumer name upstream (always stripped from client requests).
    #[serde(default = "d_consumer_header")]
    pub consumer_header: HeaderName,
    #[serde(default)]
    pub api_key: ApiKeyConfig,
    /// JWT providers by name.
    #[serde(default)]
    pub jwt: BTreeMap<String, JwtConfig>,
    /// OAuth2 introspection providers by name.
    #[serde(default)]
    pub introspection: BTreeMap<String, IntrospectionConfig>,
}

fn d_realm() -> String {
    "ringway".into()
}
fn d_cache_size() -> usize {
    10_000
}
fn d_cache_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(300))
}
fn d_consumer_header() -> HeaderName {
    HeaderName("x-consumer".into())
}

impl AuthConfig {
    /// A JWT provider that checks neither `iss` nor `aud` accepts a token minted for any
    /// audience by any issuer whose keys it trusts (another tenant or application of a shared
    /// identity provider, an ID token of another client): RFC 8725 §3.8 and §3.9 ask that
    /// both be checked. Allowed, but worth a word (see [`crate::config::Config::warnings`]).
    pub fn warnings(&self) -> Vec<String> {
        self.jwt
            .iter()
            .filter(|(_, j)| j.issuers.is_empty() && j.audiences.is_empty())
            .map(|(name, _)| {
                format!(
                    "auth.jwt.{name}: checks neither the issuer nor the audience (`issuers` and \
                     `audiences` are empty), so a token from any issuer or for any audience \
                     signed with a key it trusts passes (RFC 8725 §3.8, §3.9)"
                )
            })
            .collect()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            realm: d_realm(),
            cache_size: d_cache_size(),
            cache_max_ttl: d_cache_ttl(),
            consumer_header: d_consumer_header(),
            api_key: ApiKeyConfig::default(),
            jwt: BTreeMap::new(),
            introspection: BTreeMap::new(),
        }
    }
}

/// Where API keys are read from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    #[serde(default = "d_key_header")]
    pub header: HeaderName,
    /// Query parameter read when the header is absent (off unless set).
    #[serde(default)]
    pub query: Option<String>,
}
fn d_key_header() -> HeaderName {
    HeaderName("x-api-key".into())
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        ApiKeyConfig {
            header: d_key_header(),
            query: None,
        }
    }
}

/// One JWT provider: exactly one key source, and the claim rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// HMAC secret, as written (UTF-8 bytes).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// HMAC secret, base64 (standard or URL-safe alphabet).
    #[serde(default)]
    pub secret_base64: Option<Secret>,
    /// PEM public key (RSA, EC or Ed25519).
    #[serde(default)]
    pub public_key_file: Option<String>,
    /// A JWK Set file.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWK Set fetched in the background over HTTP or https.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// https `jwks_url`: CA bundle (PEM) its certificate is verified against, like an
    /// upstream's `tls.ca` (default: the webpki roots).
    #[serde(default)]
    pub ca: Option<String>,
    /// The algorithm of a `secret` or `public_key_file` key (default HS256 for secrets).
    #[serde(default)]
    pub algorithm: Option<String>,
    /// JWKS keys: algorithms allowed (default: what each JWK names, or implies by its curve).
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// The `kid` of a `secret` or `public_key_file` key (tokens naming another kid are refused).
    #[serde(default)]
    pub kid: Option<String>,
    /// Accepted `iss` values (empty: not checked).
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Accepted `aud` values; one must appear in the token (empty: not checked).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The JOSE header `typ` every token must carry (RFC 8725 §3.11), e.g. `"at+jwt"` for
    /// RFC 9068 access tokens; compared as a media type: case-insensitively, with or without
    /// the `application/` prefix (RFC 7515 §4.1.9). None: not checked.
    #[serde(default)]
    pub typ: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "d_leeway")]
    pub leeway_seconds: u64,
    /// Claims every token must carry.
    #[serde(default = "d_required")]
    pub required_claims: Vec<String>,
    /// Claim holding scopes: a space-separated string or an array (default: `scope`, then `scp`).
    #[serde(default)]
    pub scope_claim: Option<String>,
    /// Claim holding roles: an array or a space-separated string.
    #[serde(default = "d_roles")]
    pub roles_claim: String,
    /// Claim naming the consumer (matched against consumers' `jwt_subjects`).
    #[serde(default = "d_sub")]
    pub consumer_claim: String,
    /// Claims sent upstream: claim name -> header name.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, HeaderName>,
    /// JWKS URL: refresh no sooner than this after a fetch, even when Cache-Control says so.
    #[serde(default)]
    pub jwks_min_ttl: Option<Dur>,
    /// JWKS URL: refresh at the latest this long after a fetch.
    #[serde(default)]
    pub jwks_max_ttl: Option<Dur>,
    /// JWKS URL: an unknown `kid` triggers a refresh at most once per this interval.
    #[serde(default)]
    pub jwks_min_refresh_interval: Option<Dur>,
    /// JWKS URL: keys gone from the set are still accepted this long.
    #[serde(default)]
    pub jwks_grace: Option<Dur>,
    /// JWKS URL: connect + read timeout of a fetch.
    #[serde(default)]
    pub jwks_timeout: Option<Dur>,
}
impl JwtConfig {
    pub fn jwks_min_ttl(&self) -> std::time::Duration {
        self.jwks_min_ttl.unwrap_or_else(d_jwks_min_ttl).0
    }
    pub fn jwks_max_ttl(&self) -> std::time::Duration {
        self.jwks_max_ttl.unwrap_or_else(d_jwks_max_ttl).0
    }
    pub fn jwks_min_refresh_interval(&self) -> std::time::Duration {
        self.jwks_min_refresh_interval
            .unwrap_or_else(d_jwks_min_refresh)
            .0
    }
    pub fn jwks_grace(&self) -> std::time::Duration {
        self.jwks_grace.unwrap_or_else(d_jwks_grace).0
    }
    pub fn jwks_timeout(&self) -> std::time::Duration {
        self.jwks_timeout.unwrap_or_else(d_jwks_timeout).0
    }
}

fn d_leeway() -> u64 {
    30
}
fn d_required() -> Vec<String> {
    vec!["exp".into()]
}
fn d_roles() -> String {
    "roles".into()
}
fn d_sub() -> String {
    "sub".into()
}
fn d_jwks_min_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}
fn d_jwks_max_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(3600))
}
fn d_jwks_min_refresh() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn d_jwks_grace() -> Dur {
    Dur(std::time::Duration::from_secs(600))
}
fn d_jwks_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(2))
}

/// One RFC 7662 introspection endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// `http[s]://host[:port]/path`.
    pub url: String,
    /// https `url`: CA bundle (PEM) its certificate is verified against, like an upstream's
    /// `tls.ca` (default: the webpki roots).
    #[serde(default)]
    pub ca: Option<String>,
    pub client_id: String,
    pub client_secret: Secret,
    /// Connect, send and read, all together.
    #[serde(default = "d_intro_timeout")]
    pub timeout: Dur,
    /// Introspection calls in flight per worker; beyond it requests get 503 + Retry-After.
    #[serde(default = "d_intro_concurrent")]
    pub max_concurrent: usize,
    /// Longest an `active` answer is reused (also bounded by the token's `exp` and
    /// `[auth].cache_max_ttl`).
    #[serde(default = "d_intro_ttl")]
    pub cache_max_ttl: Dur,
    /// Claims of the answer sent upstream: claim name -> header name.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, HeaderName>,
    /// Claim naming the consumer (matched against consumers' `jwt_subjects`).
    #[serde(default = "d_sub")]
    pub consumer_claim: String,
    /// How long a refusal is remembered per worker (a token found inactive: 401; a call that
    /// failed: 503) before the same token is sent to the endpoint again. At most
    /// [`MAX_NEGATIVE_CACHE_TTL`].
    #[serde(default = "d_intro_negative_ttl")]
    pub negative_cache_ttl: Dur,
}
/// Longest `negative_cache_ttl`: a token refused by mistake (an endpoint outage) must not
/// stay refused for long.
pub const MAX_NEGATIVE_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(300);
fn d_intro_negative_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn d_intro_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(2))
}
fn d_intro_concurrent() -> usize {
    64
}
fn d_intro_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}

/// `[[consumers]]`: a caller known to the gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub name: String,
    /// Free-form values for later stages (logs, limits).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// SHA-256 of each key, as "sha256:<64 hex digits>".
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Token subjects (the provider's `consumer_claim`) that are this consumer, each tied to
    /// the provider whose tokens carry it.
    #[serde(default)]
    pub jwt_subjects: JwtSubjects,
    /// Scopes granted to this consumer's API keys.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// A consumer's `jwt_subjects`. A subject is unique only among the tokens of one issuer
/// (RFC 7519 §4.1.2, RFC 8725 §3.8), so each is tied to a provider: written as a table of
/// provider name -> subjects, or as a bare array when the config has exactly one JWT or
/// introspection provider (it is that provider's). A bare array beside several providers is
/// refused at load (see [`validate`]): matching it against every provider would let any
/// issuer's user of that name be the consumer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum JwtSubjects {
    /// `jwt_subjects = ["alice"]`: the only token provider's subjects.
    Unqualified(Vec<String>),
    /// `jwt_subjects = { main = ["alice"], partner = ["p-42"] }`.
    ByProvider(BTreeMap<String, Vec<String>>),
}

impl Default for JwtSubjects {
    fn default() -> Self {
        JwtSubjects::Unqualified(Vec::new())
    }
}

impl JwtSubjects {
    /// Every (provider, subject) pair, the provider of a bare array being `only` (the config's
    /// single token provider; `None`: there is none, and bare subjects match nothing).
    /// Items: (provider name, subject, key path below `jwt_subjects` for errors).
    pub fn pairs<'a>(
        &'a self,
        only: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = (&'a str, &'a str, String)> + 'a> {
        match self {
            JwtSubjects::Unqualified(v) => Box::new(only.into_iter().flat_map(move |p| {
                v.iter()
                    .enumerate()
                    .map(move |(j, s)| (p, s.as_str(), format!("[{j}]")))
            })),
            JwtSubjects::ByProvider(m) => Box::new(m.iter().flat_map(|(p, v)| {
                v.iter()
                    .enumerate()
                    .map(move |(j, s)| (p.as_str(), s.as_str(), format!(".{p}[{j}]")))
            })),
        }
    }
}

impl<'de> Deserialize<'de> for JwtSubjects {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JwtSubjects;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an array of subjects, or a table of provider name -> array of subjects",
                )
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, s: A) -> Result<JwtSubjects, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(s))
                    .map(JwtSubjects::Unqualified)
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<JwtSubjects, A::Error> {
                BTreeMap::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(JwtSubjects::ByProvider)
            }
        }
        d.deserialize_any(V)
    }
}

/// The only JWT or introspection provider, when there is exactly one: a consumer's bare
/// `jwt_subjects` array belongs to it.
pub fn only_token_provider(auth: &AuthConfig) -> Option<&str> {
    let mut names = auth.jwt.keys().chain(auth.introspection.keys());
    match (names.next(), names.next()) {
        (Some(n), None) => Some(n.as_str()),
        _ => None,
    }
}

/// A route's `auth`: a method name, or a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteAuth {
    /// Methods tried in order; the first that accepts the request wins. Empty: no auth.
    pub any_of: Vec<String>,
    pub scopes_any: Vec<String>,
    pub scopes_all: Vec<String>,
    pub roles_any: Vec<String>,
    pub roles_all: Vec<String>,
    /// Remove the credential (Authorization, the API key header) before proxying.
    pub hide_credentials: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteAuthTable {
    any_of: Vec<String>,
    #[serde(default)]
    scopes_any: Vec<String>,
    #[serde(default)]
    scopes_all: Vec<String>,
    #[serde(default)]
    roles_any: Vec<String>,
    #[serde(default)]
    roles_all: Vec<String>,
    #[serde(default = "d_true")]
    hide_credentials: bool,
}
fn d_true() -> bool {
    true
}

impl<'de> Deserialize<'de> for RouteAuth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RouteAuth;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a method name (\"none\", \"api_key\", \"jwt\", a provider name) or a table with `any_of`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RouteAuth, E> {
                Ok(RouteAuth {
                    any_of: if s == "none" {
                        Vec::new()
                    } else {
                        vec![s.to_string()]
                    },
                    scopes_any: Vec::new(),
                    scopes_all: Vec::new(),
                    roles_any: Vec::new(),
                    roles_all: Vec::new(),
                    hide_credentials: true,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<RouteAuth, A::Error> {
                let t = RouteAuthTable::deserialize(de::value::MapAccessDeserializer::new(m))?;
                Ok(RouteAuth {
                    any_of: t.any_of,
                    scopes_any: t.scopes_any,
                    scopes_all: t.scopes_all,
                    roles_any: t.roles_any,
                    roles_all: t.roles_all,
                    hide_credentials: t.hide_credentials,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// What a route's method name refers to, once resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodRef {
    ApiKey,
    /// Index into `[auth.jwt]` (in name order).
    Jwt(usize),
    /// Index into `[auth.introspection]` (in name order).
    Introspection(usize),
}

/// Resolves a method name: "api_key", a provider name, or "jwt" / "introspection" when
/// exactly one provider of that kind exists.
pub fn resolve_method(auth: &AuthConfig, name: &str) -> Result<MethodRef, String> {
    if name == "api_key" {
        return Ok(MethodRef::ApiKey);
    }
    if let Some(i) = auth.jwt.keys().position(|k| k == name) {
        return Ok(MethodRef::Jwt(i));
    }
    if let Some(i) = auth.introspection.keys().position(|k| k == name) {
        return Ok(MethodRef::Introspection(i));
    }
    match name {
        "jwt" if auth.jwt.len() == 1 => Ok(MethodRef::Jwt(0)),
        "introspection" if auth.introspection.len() == 1 => Ok(MethodRef::Introspection(0)),
        _ => Err(format!(
            "unknown auth method {name:?}: use \"none\", \"api_key\", or a provider of [auth.jwt] {:?} or [auth.introspection] {:?}",
            auth.jwt.keys().collect::<Vec<_>>(),
            auth.introspection.keys().collect::<Vec<_>>()
        )),
    }
}

/// Parses "sha256:<64 hex>" into the digest.
pub fn parse_key_hash(s: &str) -> Result<[u8; 32], String> {
    let hex = s.strip_prefix("sha256:").ok_or_else(|| {
        "API keys are stored as \"sha256:<64 hex digits>\", never as keys".to_string()
    })?;
    if hex.len() != 64 {
        return Err(format!(
            "a SHA-256 hash has 64 hex digits, this one has {}",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| "the hash holds a character that is not a hex digit".to_string())?;
    }
    Ok(out)
}

/// Checks the auth sections and every route's policy. Errors: (key path, reason).
pub fn validate(
    auth: &AuthConfig,
    consumers: &[ConsumerConfig],
    routes: &[Option<RouteAuth>],
) -> Result<(), (String, String)> {
    if auth.cache_size == 0 {
        return Err(("auth.cache_size".into(), "must be above 0".into()));
    }
    if let Some(q) = &auth.api_key.query {
        if q.is_empty() || q.contains(['&', '=', '#']) {
            return Err((
                "auth.api_key.query".into(),
                format!("{q:?} is not a query parameter name"),
            ));
        }
    }
    // `[auth.jwt.""]` is valid TOML; a provider without a name cannot be named by a route's
    // `auth` nor told apart in logs and metrics.
    for (table, empty) in [
        ("jwt", auth.jwt.contains_key("")),
        ("introspection", auth.introspection.contains_key("")),
    ] {
        if empty {
            return Err((
                format!("auth.{table}.\"\""),
                "a provider needs a name that is not empty".into(),
            ));
        }
    }
    for name in auth.jwt.keys().chain(auth.introspection.keys()) {
        if name == "none" || name == "api_key" {
            return Err((
                format!("auth.{name}"),
                format!("{name:?} is reserved for the method of that name"),
            ));
        }
    }
    if let Some(n) = auth
        .jwt
        .keys()
        .find(|n| auth.introspection.contains_key(*n))
    {
        return Err((
            format!("auth.introspection.{n}"),
            "a JWT provider has the same name".into(),
        ));
    }
    for (name, j) in &auth.jwt {
        super::jwt::check_config(j).map_err(|(k, r)| (format!("auth.jwt.{name}.{k}"), r))?;
        // Static key sources are loaded now, so a bad file fails the load.
        if j.jwks_url.is_none() {
            super::jwt::load_static(j).map_err(|(k, r)| (format!("auth.jwt.{name}.{k}"), r))?;
        }
    }
    for (name, i) in &auth.introspection {
        super::jwks::Endpoint::load(&i.url, i.ca.as_deref(), "url")
            .map_err(|(k, r)| (format!("auth.introspection.{name}.{k}"), r))?;
        if i.max_concurrent == 0 {
            return Err((
                format!("auth.introspection.{name}.max_concurrent"),
                "must be above 0".into(),
            ));
        }
        if i.negative_cache_ttl.0 > MAX_NEGATIVE_CACHE_TTL {
            return Err((
                format!("auth.introspection.{name}.negative_cache_ttl"),
                format!("must be at most {}s", MAX_NEGATIVE_CACHE_TTL.as_secs()),
            ));
        }
    }
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    let mut subjects = HashSet::new();
    // Token providers: JWT and introspection names are unique together (checked above).
    let providers: Vec<&String> = auth.jwt.keys().chain(auth.introspection.keys()).collect();
    for (i, c) in consumers.iter().enumerate() {
        if c.name.is_empty() || c.name.bytes().any(|b| b < 0x21 || b == 0x7f) {
            return Err((
                format!("consumers[{i}].name"),
                "must be non-empty, without spaces or control characters (it is sent in a header)"
                    .into(),
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err((
                format!("consumers[{i}].name"),
                format!("consumer {:?} is defined twice", c.name),
            ));
        }
        for (j, k) in c.api_keys.iter().enumerate() {
            let h = parse_key_hash(k).map_err(|r| (format!("consumers[{i}].api_keys[{j}]"), r))?;
            if !hashes.insert(h) {
                return Err((
                    format!("consumers[{i}].api_keys[{j}]"),
                    "this key hash is listed twice".into(),
                ));
            }
        }
        match &c.jwt_subjects {
            JwtSubjects::Unqualified(v) if !v.is_empty() && providers.len() > 1 => {
                return Err((
                    format!("consumers[{i}].jwt_subjects"),
                    format!(
                        "with several token providers {:?}, say which one's tokens carry each \
                         subject, e.g. `jwt_subjects = {{ {} = [{:?}] }}`: a subject is unique \
                         only within its issuer (RFC 7519 §4.1.2), so a bare subject would let \
                         a user of that name at any of them be this consumer",
                        providers, providers[0], v[0]
                    ),
                ));
            }
            JwtSubjects::ByProvider(m) => {
                if let Some(p) = m.keys().find(|p| !providers.contains(p)) {
                    return Err((
                        format!("consumers[{i}].jwt_subjects.{p}"),
                        format!(
                            "no JWT or introspection provider is named {p:?} (defined: {:?})",
                            providers
                        ),
                    ));
                }
            }
            JwtSubjects::Unqualified(_) => {}
        }
        for (p, s, at) in c.jwt_subjects.pairs(only_token_provider(auth)) {
            if !subjects.insert((p, s)) {
                return Err((
                    format!("consumers[{i}].jwt_subjects{at}"),
                    format!("subject {s:?} of {p:?} already belongs to another consumer"),
                ));
            }
        }
    }
    for (i, r) in routes.iter().enumerate() {
        let Some(r) = r else { continue };
        for m in &r.any_of {
            resolve_method(auth, m).map_err(|e| (format!("routes[{i}].auth"), e))?;
        }
        let wants = !(r.scopes_any.is_empty()
            && r.scopes_all.is_empty()
            && r.roles_any.is_empty()
            && r.roles_all.is_empty());
        if r.any_of.is_empty() && wants {
            return Err((
                format!("routes[{i}].auth"),
                "scopes or roles need at least one method in `any_of`".into(),
            ));
        }
        for s in r
            .scopes_any
            .iter()
            .chain(&r.scopes_all)
            .chain(&r.roles_any)
            .chain(&r.roles_all)
        {
            if s.is_empty()
                || s.bytes()
                    .any(|b| b <= b' ' || b == b'"' || b == b'\\' || b == 0x7f)
            {
                return Err((
                    format!("routes[{i}].auth"),
                    format!("{s:?} is not a scope token (RFC 6749 §3.3)"),
                ));
            }
        }
    }
    Ok(())
}
