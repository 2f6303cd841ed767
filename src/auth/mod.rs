//! Authentication at the edge: JWT, API keys with consumers, OAuth2 introspection, and the
//! per-route policies that combine them.
//!
//! ```text
//!  request ──► route ──► policy.any_of, in order ──► identity ──► scopes/roles ──► rate limits
//!                          jwt: per-core cache ─miss─► signature + claims
//!                          api_key: SHA-256 ─► consumer (constant-time compare)
//!                          introspection: per-core cache ─miss─► POST to the endpoint
//! ```
//!
//! Every worker owns its caches and its copy of the consumers; nothing on the request path is
//! shared between threads. Key sets fetched from a JWKS URL are published by a background
//! thread as an `Arc` plus a version number, and each worker picks a new version up in its
//! 50 ms sync task ([`WorkerAuth::sync`]).
//!
//! Answers (RFC 6750 §3): no credentials → 401 with a bare `Bearer realm=...` challenge; bad
//! credentials → 401 with `error="invalid_token"`; valid but missing a scope or role → 403 with
//! `error="insufficient_scope"`. Neither logs nor error bodies ever carry a credential.

pub mod apikey;
pub mod config;
pub mod introspect;
pub mod jwks;
pub mod jwt;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::http::encode::put_header;
use crate::http::request::RequestHead;
use config::{AuthConfig, MethodRef, RouteAuth};

/// Why credentials were refused. Carries no text from the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFail {
    /// The route needs credentials and the request has none.
    Missing,
    /// Not a JWT / not a bearer token / claims of the wrong type.
    Malformed,
    /// No configured key matches the token's `kid`.
    UnknownKey,
    /// The token's `alg` is not one its key allows.
    AlgorithmNotAllowed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim,
    /// The token's JOSE header `typ` is not the one its provider requires.
    WrongType,
    /// No consumer holds this API key.
    UnknownApiKey,
    /// The introspection endpoint said `active: false`.
    Inactive,
}

impl AuthFail {
    /// The text the client gets. Every failure to verify a token's signature with a key
    /// (no key of its `kid`, an algorithm its key does not allow, a wrong or undecodable
    /// signature) reads the same: a different text for each would let a client learn which
    /// key ids exist, and which algorithm each one has, by sending tokens it made up. The
    /// event log keeps the [`reason`](AuthFail::reason).
    pub fn message(&self) -> &'static str {
        match self {
            AuthFail::UnknownKey | AuthFail::AlgorithmNotAllowed | AuthFail::BadSignature => {
                "the token could not be verified"
            }
            f => f.reason(),
        }
    }

    /// What exactly went wrong, for the event log (`RINGWAY_LOG=debug`), not for the client.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFail::Missing => "credentials are required",
            AuthFail::Malformed => "the token is malformed",
            AuthFail::UnknownKey => "the token's key is not known",
            AuthFail::AlgorithmNotAllowed => "the token's algorithm is not allowed for its key",
            AuthFail::BadSignature => "the token's signature is invalid",
            AuthFail::Expired => "the token has expired",
            AuthFail::NotYetValid => "the token is not valid yet",
            AuthFail::WrongIssuer => "the token's issuer is not accepted",
            AuthFail::WrongAudience => "the token is not meant for this audience",
            AuthFail::MissingClaim => "the token lacks a required claim",
            AuthFail::WrongType => "the token's type (typ) is not accepted",
            AuthFail::UnknownApiKey => "the API key is not valid",
            AuthFail::Inactive => "the token is not active",
        }
    }
}

/// The outcome of a refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// 401.
    Unauthorized(AuthFail),
    /// 403: authenticated, but a scope or role is missing.
    Forbidden,
    /// 503: the introspection endpoint failed, timed out, or this worker has too many calls
    /// to it in flight.
    Unavailable,
}

/// Which method authenticated a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
    Introspection,
}

/// A consumer: a caller known by name, with metadata for later stages.
#[derive(Debug)]
pub struct Consumer {
    /// Position in `[[consumers]]`: a stable small key for per-consumer state.
    pub index: u32,
    pub name: Rc<str>,
    pub metadata: std::collections::BTreeMap<String, String>,
    scopes: Box<[Box<str>]>,
}

/// A credential that passed its checks: cached per core and shared by every request that
/// presents the same token.
#[derive(Debug)]
pub struct Verified {
    /// The token's claims (JWT) or the introspection answer.
    pub claims: Map<String, Value>,
    pub scopes: Box<[Box<str>]>,
    pub roles: Box<[Box<str>]>,
    pub consumer: Option<Rc<Consumer>>,
    /// Forwarded-claim header lines, encoded once.
    headers: Box<[u8]>,
    /// Unix second after which the entry must be checked again.
    valid_until: u64,
}

/// Who the request is, once authenticated: on the connection for the length of a request
/// (`Conn.identity`), for the stages after auth (rate limits by `consumer` or `claim:NAME`,
/// logs).
///
/// ```ignore
/// if let Some(name) = conn.identity.consumer_name() { /* key a limit by consumer */ }
/// if let Some(v) = conn.identity.claim("tenant") { /* key a limit by a claim */ }
/// ```
#[derive(Debug, Default)]
pub struct Identity {
    /// None: the route has no auth (or the request was refused).
    pub method: Option<AuthMethod>,
    pub consumer: Option<Rc<Consumer>>,
    /// The verified token (JWT or introspection), if that is how the request authenticated.
    pub token: Option<Rc<Verified>>,
}

impl Identity {
    pub fn clear(&mut self) {
        self.method = None;
        self.consumer = None;
        self.token = None;
    }

    pub fn is_authenticated(&self) -> bool {
        self.method.is_some()
    }

    /// The consumer's name, when the credential maps to a consumer.
    pub fn consumer_name(&self) -> Option<&str> {
        self.consumer.as_deref().map(|c| &*c.name)
    }

    /// The consumer's index in `[[consumers]]` (stable for the config's life).
    pub fn consumer_index(&self) -> Option<u32> {
        self.consumer.as_deref().map(|c| c.index)
    }

    /// A claim of the verified token (JWT claims, or the fields of an introspection answer).
    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.token.as_deref().and_then(|t| t.claims.get(name))
    }

    /// The token's `sub`.
    pub fn subject(&self) -> Option<&str> {
        self.claim("sub").and_then(Value::as_str)
    }

    fn scopes(&self) -> &[Box<str>] {
        match (&self.token, &self.consumer) {
            (Some(t), _) => &t.scopes,
            (None, Some(c)) => &c.scopes,
            _ => &[],
        }
    }

    fn roles(&self) -> &[Box<str>] {
        self.token.as_deref().map_or(&[], |t| &t.roles)
    }
}

/// A route's compiled policy.
#[derive(Debug)]
pub struct Policy {
    methods: Vec<MethodRef>,
    scopes_any: Vec<Box<str>>,
    scopes_all: Vec<Box<str>>,
    roles_any: Vec<Box<str>>,
    roles_all: Vec<Box<str>>,
    /// Header names removed before proxying (the credentials), when `hide_credentials`.
    pub hidden: Vec<Box<[u8]>>,
    /// The API key's query parameter name, removed from the target before proxying, when
    /// `hide_credentials` and keys may come in the query.
    pub hidden_query: Option<Box<[u8]>>,
    /// `www-authenticate` lines, CRLF-terminated.
    challenge_missing: Box<[u8]>,
    challenge_invalid: Box<[u8]>,
    challenge_scope: Box<[u8]>,
}

impl Policy {
    /// Compiles a validated route policy; `None` for `auth = "none"`.
    pub fn compile(auth: &AuthConfig, r: &RouteAuth) -> Option<Policy> {
        if r.any_of.is_empty() {
            return None;
        }
        let methods: Vec<MethodRef> = r
            .any_of
            .iter()
            .map(|m| config::resolve_method(auth, m).expect("validated at load"))
            .collect();
        let mut hidden: Vec<Box<[u8]>> = Vec::new();
        if r.hide_credentials {
            if methods.iter().any(|m| *m != MethodRef::ApiKey) {
                hidden.push(b"authorization".as_slice().into());
            }
            if methods.contains(&MethodRef::ApiKey) {
                hidden.push(auth.api_key.header.0.as_bytes().into());
            }
        }
        let hidden_query = auth
            .api_key
            .query
            .as_ref()
            .filter(|_| r.hide_credentials && methods.contains(&MethodRef::ApiKey))
            .map(|q| crate::http::form_decoded(q.as_bytes()).into());
        let b = |v: &[String]| {
            v.iter()
                .map(|s| s.as_str().into())
                .collect::<Vec<Box<str>>>()
        };
        let realm = &auth.realm;
        let line = |v: String| -> Box<[u8]> {
            let mut out = BytesMut::new();
            put_header(&mut out, b"www-authenticate", v.as_bytes());
            out.to_vec().into_boxed_slice()
        };
        let wanted: Vec<&str> = r
            .scopes_all
            .iter()
            .chain(&r.scopes_any)
            .map(String::as_str)
            .collect();
        let scope = if wanted.is_empty() {
            String::new()
        } else {
            format!(", scope=\"{}\"", wanted.join(" "))
        };
        Some(Policy {
            methods,
            scopes_any: b(&r.scopes_any),
            scopes_all: b(&r.scopes_all),
            roles_any: b(&r.roles_any),
            roles_all: b(&r.roles_all),
            hidden,
            hidden_query,
            challenge_missing: line(format!("Bearer realm=\"{realm}\"")),
            challenge_invalid: line(format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")),
            challenge_scope: line(format!(
                "Bearer realm=\"{realm}\", error=\"insufficient_scope\"{scope}"
            )),
        })
    }

    /// The `www-authenticate` line for a refusal (empty for 503).
    pub fn challenge(&self, d: Denied) -> &[u8] {
        match d {
            Denied::Unauthorized(AuthFail::Missing) => &self.challenge_missing,
            Denied::Unauthorized(_) => &self.challenge_invalid,
            Denied::Forbidden => &self.challenge_scope,
            Denied::Unavailable => &[],
        }
    }

    fn allows(&self, id: &Identity) -> bool {
        let has = |list: &[Box<str>], s: &str| list.iter().any(|x| &**x == s);
        let scopes = id.scopes();
        let roles = id.roles();
        (self.scopes_any.is_empty() || self.scopes_any.iter().any(|s| has(scopes, s)))
            && self.scopes_all.iter().all(|s| has(scopes, s))
            && (self.roles_any.is_empty() || self.roles_any.iter().any(|s| has(roles, s)))
            && self.roles_all.iter().all(|s| has(roles, s))
    }
}

/// Shared between workers: the published key set of each JWT provider, and each
/// introspection provider's endpoint (with its TLS client config, built once here).
pub struct AuthShared {
    pub jwt: Vec<Arc<jwks::KeySource>>,
    /// In `[auth.introspection]` order.
    pub introspection: Vec<jwks::Endpoint>,
}

impl AuthShared {
    /// Loads static key sets, prepares URL sources (fetched by [`jwks::spawn_fetchers`]) and
    /// the introspection endpoints. The files were checked when the config loaded; an error
    /// here means they changed since.
    pub fn new(cfg: &Config) -> Result<Arc<AuthShared>, String> {
        let mut jwt = Vec::new();
        for (name, j) in &cfg.auth.jwt {
            let src = if let Some(url) = &j.jwks_url {
                let ep = jwks::Endpoint::load(url, j.ca.as_deref(), "jwks_url")
                    .map_err(|(k, r)| format!("auth.jwt.{name}.{k}: {r}"))?;
                jwks::KeySource::fetched(j.clone(), ep)
            } else {
                let set =
                    jwt::load_static(j).map_err(|(k, r)| format!("auth.jwt.{name}.{k}: {r}"))?;
                jwks::KeySource::fixed(set)
            };
            jwt.push(Arc::new(src));
        }
        let mut introspection = Vec::new();
        for (name, i) in &cfg.auth.introspection {
            introspection.push(
                jwks::Endpoint::load(&i.url, i.ca.as_deref(), "url")
                    .map_err(|(k, r)| format!("auth.introspection.{name}.{k}: {r}"))?,
            );
        }
        Ok(Arc::new(AuthShared { jwt, introspection }))
    }
}

/// One JWT provider as a worker sees it.
struct JwtProvider {
    source: Arc<jwks::KeySource>,
    /// This worker's copy of the current key set, refreshed by `sync`.
    keys: RefCell<Arc<jwt::KeySet>>,
    version: Cell<u64>,
    rules: jwt::ClaimRules,
    scope_claim: Option<String>,
    roles_claim: String,
    consumer_claim: String,
    forward: Vec<(String, Box<[u8]>)>,
    /// Unix second this worker last asked for a refresh (unknown kid).
    asked: Cell<u64>,
}

/// A cached credential check.
struct Cached {
    /// Which method slot verified it (part of the key: the same token may be judged by two
    /// providers).
    slot: u32,
    token: Box<[u8]>,
    v: Rc<Verified>,
}

/// A worker's authentication state: consumers, providers, caches.
pub struct WorkerAuth {
    consumer_header: Box<[u8]>,
    api_key_header: Box<[u8]>,
    api_key_query: Option<Box<[u8]>>,
    keys: apikey::KeyTable,
    /// Consumers by token subject, one map per provider, indexed by cache slot (the JWT
    /// providers, then the introspection endpoints): a subject names a consumer only in the
    /// tokens of the provider it was listed for (RFC 7519 §4.1.2).
    by_subject: Vec<HashMap<Box<str>, Rc<Consumer>>>,
    jwt: Vec<JwtProvider>,
    introspection: Vec<introspect::Provider>,
    cache: RefCell<quick_cache::unsync::Cache<u64, Cached>>,
    /// Keyed per process: token hashes cannot be aimed at one cache slot from outside.
    hasher: std::collections::hash_map::RandomState,
    max_ttl: u64,
}

impl WorkerAuth {
    pub fn new(cfg: &Config, shared: &AuthShared) -> WorkerAuth {
        let a = &cfg.auth;
        let consumers: Vec<Rc<Consumer>> = cfg
            .consumers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Rc::new(Consumer {
                    index: i as u32,
                    name: c.name.as_str().into(),
                    metadata: c.metadata.clone(),
                    scopes: c.scopes.iter().map(|s| s.as_str().into()).collect(),
                })
            })
            .collect();
        // Provider names are unique across both kinds (checked at load).
        let slots: Vec<&String> = a.jwt.keys().chain(a.introspection.keys()).collect();
        let mut by_subject: Vec<HashMap<Box<str>, Rc<Consumer>>> =
            slots.iter().map(|_| HashMap::new()).collect();
        let only = config::only_token_provider(a);
        for (c, cc) in consumers.iter().zip(&cfg.consumers) {
            for (p, s, _) in cc.jwt_subjects.pairs(only) {
                if let Some(slot) = slots.iter().position(|n| *n == p) {
                    by_subject[slot].insert(s.into(), c.clone());
                }
            }
        }
        let keys = apikey::KeyTable::new(&cfg.consumers, &consumers);
        let forward = |f: &jwt::ForwardClaims| {
            f.iter()
                .map(|(c, h)| (c.clone(), h.0.as_bytes().into()))
                .collect::<Vec<(String, Box<[u8]>)>>()
        };
        let jwt = a
            .jwt
            .values()
            .zip(&shared.jwt)
            .map(|(j, src)| {
                let (set, version) = src.current();
                JwtProvider {
                    source: src.clone(),
                    keys: RefCell::new(set),
                    version: Cell::new(version),
                    rules: jwt::ClaimRules::from_config(j),
                    scope_claim: j.scope_claim.clone(),
                    roles_claim: j.roles_claim.clone(),
                    consumer_claim: j.consumer_claim.clone(),
                    forward: forward(&j.forward_claims),
                    asked: Cell::new(0),
                }
            })
            .collect();
        let introspection = a
            .introspection
            .values()
            .zip(&shared.introspection)
            .map(|(i, ep)| introspect::Provider::new(i, ep, forward(&i.forward_claims)))
            .collect();
        WorkerAuth {
            consumer_header: a.consumer_header.0.as_bytes().into(),
            api_key_header: a.api_key.header.0.as_bytes().into(),
            // Compared with a request's names as both read (`+` a space, `%XX` decoded).
            api_key_query: a
                .api_key
                .query
                .as_ref()
                .map(|q| crate::http::form_decoded(q.as_bytes()).into()),
            keys,
            by_subject,
            jwt,
            introspection,
            cache: RefCell::new(quick_cache::unsync::Cache::new(a.cache_size)),
            hasher: Default::default(),
            max_ttl: a.cache_max_ttl.0.as_secs().max(1),
        }
    }

    /// Header names carrying identity upstream (the consumer, forwarded claims, the mTLS
    /// subject of every listener): only the gateway sets them, so client-sent copies are
    /// removed on every route.
    pub fn identity_headers(cfg: &Config) -> Vec<Box<[u8]>> {
        let mut v: Vec<Box<[u8]>> = cfg
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref()?.client_auth.as_ref())
            .map(|c| c.subject_header.0.as_bytes().into())
            .collect();
        let has_auth = !(cfg.auth.jwt.is_empty()
            && cfg.auth.introspection.is_empty()
            && cfg.consumers.is_empty());
        if has_auth {
            v.push(cfg.auth.consumer_header.0.as_bytes().into());
        }
        let claims = cfg
            .auth
            .jwt
            .values()
            .flat_map(|j| j.forward_claims.values())
            .chain(
                cfg.auth
                    .introspection
                    .values()
                    .flat_map(|i| i.forward_claims.values()),
            );
        for h in claims {
            let h: Box<[u8]> = h.0.as_bytes().into();
            if !v.contains(&h) {
                v.push(h);
            }
        }
        v
    }

    /// The query parameter read as an API key (`[auth.api_key].query`), if any: the access
    /// log writes its values redacted.
    pub fn api_key_query(&self) -> Option<&[u8]> {
        self.api_key_query.as_deref()
    }

    /// Picks up key sets published since the last call (the worker's 50 ms sync task).
    pub fn sync(&self) {
        for p in &self.jwt {
            if p.source.version() != p.version.get() {
                let (set, v) = p.source.current();
                *p.keys.borrow_mut() = set;
                p.version.set(v);
            }
        }
    }

    fn cache_key(&self, slot: u32, token: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        slot.hash(&mut h);
        token.hash(&mut h);
        h.finish()
    }

    fn cached(&self, slot: u32, token: &[u8], now: u64) -> Option<Rc<Verified>> {
        let key = self.cache_key(slot, token);
        let mut cache = self.cache.borrow_mut();
        let hit = match cache.get(&key) {
            Some(c) if c.slot == slot && &*c.token == token => {
                if c.v.valid_until >= now {
                    return Some(c.v.clone());
                }
                true
            }
            _ => false,
        };
        if hit {
            cache.remove(&key);
        }
        None
    }

    fn remember(&self, slot: u32, token: &[u8], v: Rc<Verified>) {
        let key = self.cache_key(slot, token);
        self.cache.borrow_mut().insert(
            key,
            Cached {
                slot,
                token: token.into(),
                v,
            },
        );
    }

    /// Authenticates a request under `policy`, filling `id`. `now`: Unix seconds.
    pub async fn check(
        &self,
        policy: &Policy,
        head: &RequestHead,
        now: u64,
        id: &mut Identity,
    ) -> Result<(), Denied> {
        id.clear();
        let bearer = bearer_token(head);
        let mut first_fail: Option<AuthFail> = None;
        let mut unavailable = false;
        for m in &policy.methods {
            let r = match *m {
                MethodRef::Jwt(i) => match bearer {
                    None => continue,
                    Some(Err(f)) => Err(f),
                    Some(Ok(t)) => self.verify_jwt(i, t, now).map(|v| (AuthMethod::Jwt, v)),
                },
                MethodRef::Introspection(i) => match bearer {
                    None => continue,
                    Some(Err(f)) => Err(f),
                    Some(Ok(t)) => match self.introspect(i, t, now).await {
                        Ok(v) => Ok((AuthMethod::Introspection, v)),
                        Err(None) => {
                            unavailable = true;
                            continue;
                        }
                        Err(Some(f)) => Err(f),
                    },
                },
                MethodRef::ApiKey => match self.api_key(head) {
                    None => continue,
                    Some(Ok(c)) => {
                        id.method = Some(AuthMethod::ApiKey);
                        id.consumer = Some(c);
                        break;
                    }
                    Some(Err(f)) => Err(f),
                },
            };
            match r {
                Ok((method, v)) => {
                    id.method = Some(method);
                    id.consumer = v.consumer.clone();
                    id.token = Some(v);
                    break;
                }
                Err(f) => {
                    first_fail.get_or_insert(f);
                }
            }
        }
        if id.method.is_none() {
            // A token the endpoint could not judge may be valid: say so (503), rather than
            // call it invalid because another method refused it.
            if unavailable {
                return Err(Denied::Unavailable);
            }
            return Err(Denied::Unauthorized(
                first_fail.unwrap_or(AuthFail::Missing),
            ));
        }
        if policy.allows(id) {
            Ok(())
        } else {
            Err(Denied::Forbidden)
        }
    }

    /// Writes the identity headers sent upstream: forwarded claims and the consumer.
    pub fn put_upstream_headers(&self, id: &Identity, out: &mut BytesMut) {
        if let Some(t) = &id.token {
            out.put_slice(&t.headers);
        }
        if let Some(c) = &id.consumer {
            put_header(out, &self.consumer_header, c.name.as_bytes());
        }
    }

    /// Checks a bearer token with JWT provider `i` (in `[auth.jwt]` name order): from this
    /// worker's cache, else by signature and claims (then cached).
    pub fn verify_jwt(&self, i: usize, token: &str, now: u64) -> Result<Rc<Verified>, AuthFail> {
        let slot = i as u32;
        if let Some(v) = self.cached(slot, token.as_bytes(), now) {
            return Ok(v);
        }
        let p = &self.jwt[i];
        let keys = p.keys.borrow().clone();
        let claims = match jwt::verify(token, &keys, &p.rules, now) {
            Ok(c) => c,
            Err(AuthFail::UnknownKey) => {
                // A key rotated in at the issuer: ask the fetcher for the set again (it
                // refreshes at most once per `jwks_min_refresh_interval`).
                if p.asked.get() != now {
                    p.asked.set(now);
                    p.source.want_refresh();
                }
                return Err(AuthFail::UnknownKey);
            }
            Err(f) => return Err(f),
        };
        let until = claims
            .exp
            .map_or(u64::MAX, |e| e.saturating_add(p.rules.leeway))
            .min(now.saturating_add(self.max_ttl));
        let v = Rc::new(self.verified(
            claims.map,
            p.scope_claim.as_deref(),
            &p.roles_claim,
            (slot, &p.consumer_claim),
            &p.forward,
            until,
        ));
        self.remember(slot, token.as_bytes(), v.clone());
        Ok(v)
    }

    /// Builds the cached form of checked claims. `slot`: the cache slot of the provider that
    /// checked them, whose consumer subjects `consumer_claim` is looked up in.
    fn verified(
        &self,
        claims: Map<String, Value>,
        scope_claim: Option<&str>,
        roles_claim: &str,
        (slot, consumer_claim): (u32, &str),
        forward: &[(String, Box<[u8]>)],
        valid_until: u64,
    ) -> Verified {
        let scopes = match scope_claim {
            Some(c) => jwt::claim_list(&claims, c),
            None => {
                let s = jwt::claim_list(&claims, "scope");
                if s.is_empty() {
                    jwt::claim_list(&claims, "scp")
                } else {
                    s
                }
            }
        };
        let roles = jwt::claim_list(&claims, roles_claim);
        let consumer = claims
            .get(consumer_claim)
            .and_then(Value::as_str)
            .and_then(|s| self.by_subject.get(slot as usize)?.get(s))
            .cloned();
        let mut headers = BytesMut::new();
        for (claim, header) in forward {
            if let Some(v) = claims.get(claim).and_then(jwt::claim_header_value) {
                put_header(&mut headers, header, v.as_bytes());
            }
        }
        Verified {
            claims,
            scopes: scopes.into(),
            roles: roles.into(),
            consumer,
            headers: headers.to_vec().into_boxed_slice(),
            valid_until,
        }
    }

    fn api_key(&self, head: &RequestHead) -> Option<Result<Rc<Consumer>, AuthFail>> {
        let key = match head.header(&self.api_key_header) {
            Some(_) if head.header_values(&self.api_key_header).nth(1).is_some() => {
                return Some(Err(AuthFail::UnknownApiKey))
            }
            Some(v) => crate::http::trim_ows(v),
            None => {
                let q = self.api_key_query.as_deref()?;
                // Read as the upstream reads it: as `application/x-www-form-urlencoded`, each
                // `+` a space and `%XX` decoded (no longer than a key may be).
                let mut buf = [0u8; apikey::MAX_KEY_BYTES];
                let found = match query_param(head.bytes(head.path_query), q)? {
                    Ok(raw) => crate::http::form_decode_into(raw, &mut buf),
                    Err(()) => None,
                };
                return Some(match found {
                    Some(key) if !key.is_empty() => {
                        self.keys.find(key).ok_or(AuthFail::UnknownApiKey)
                    }
                    _ => Err(AuthFail::UnknownApiKey),
                });
            }
        };
        if key.is_empty() {
            return Some(Err(AuthFail::UnknownApiKey));
        }
        Some(self.keys.find(key).ok_or(AuthFail::UnknownApiKey))
    }

    /// `Err(None)`: the endpoint could not answer (503).
    async fn introspect(
        &self,
        i: usize,
        token: &str,
        now: u64,
    ) -> Result<Rc<Verified>, Option<AuthFail>> {
        // Slots after the JWT providers'.
        let slot = (self.jwt.len() + i) as u32;
        if let Some(v) = self.cached(slot, token.as_bytes(), now) {
            return Ok(v);
        }
        let p = &self.introspection[i];
        let answer = p.call(token).await?;
        let until = answer
            .exp
            .unwrap_or(u64::MAX)
            .min(now.saturating_add(p.max_ttl.min(self.max_ttl)));
        if answer.exp.is_some_and(|e| e < now) {
            p.remember_refusal(token.as_bytes(), Some(AuthFail::Expired));
            return Err(Some(AuthFail::Expired));
        }
        // Not valid yet (RFC 7662 §2.2): refused, and not remembered, since it will be.
        if answer
            .nbf
            .is_some_and(|n| now.saturating_add(introspect::NBF_LEEWAY_SECS) < n)
        {
            return Err(Some(AuthFail::NotYetValid));
        }
        let v = Rc::new(self.verified(
            answer.claims,
            None,
            "roles",
            (slot, &p.consumer_claim),
            &p.forward,
            until,
        ));
        if answer.cacheable {
            self.remember(slot, token.as_bytes(), v.clone());
        }
        Ok(v)
    }
}

/// The bearer token of `Authorization: Bearer <token>` (RFC 6750 §2.1). `None`: no
/// Authorization header or another scheme; `Err`: a Bearer header without a valid token.
fn bearer_token(head: &RequestHead) -> Option<Result<&str, AuthFail>> {
    let v = head.header(b"authorization")?;
    if head.header_values(b"authorization").nth(1).is_some() {
        // Two credentials: which one the upstream would read is anyone's guess.
        return Some(Err(AuthFail::Malformed));
    }
    let v = crate::http::trim_ows(v);
    if v.len() < 7 || !v[..6].eq_ignore_ascii_case(b"bearer") || v[6] != b' ' {
        return None;
    }
    let t = crate::http::trim_ows(&v[7..]);
    // token68: ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/", then "=" padding.
    let body_end = t.iter().rposition(|b| *b != b'=').map_or(0, |p| p + 1);
    let ok = !t.is_empty()
        && t.len() <= jwt::MAX_TOKEN_BYTES
        && t[..body_end]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b));
    if !ok {
        return Some(Err(AuthFail::Malformed));
    }
    // ASCII checked above.
    Some(std::str::from_utf8(t).map_err(|_| AuthFail::Malformed))
}

/// The raw value of query parameter `name` (its value not yet decoded): `None` when there is
/// none, `Err` when there are several. Names are compared as an upstream reads them
/// (`application/x-www-form-urlencoded`: `api%5Fkey` is `api_key`), so that no copy of the
/// parameter passes unseen; a name without `=` has an empty value. The query ends at a `#`
/// ([`crate::http::query_of`], shared with `hide_credentials` and the access log).
fn query_param<'a>(path_query: &'a [u8], name: &[u8]) -> Option<Result<&'a [u8], ()>> {
    let (_, q) = crate::http::query_of(path_query)?;
    let mut found = None;
    for (kv, k) in crate::http::query_params(q) {
        if crate::http::form_decodes_to(k, name) {
            if found.is_some() {
                return Some(Err(()));
            }
            found = Some(kv.get(k.len() + 1..).unwrap_or_default());
        }
    }
    found.map(Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const NOW: u64 = 1_700_000_000;

    fn worker(extra: &str) -> WorkerAuth {
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[auth.jwt.j]\nsecret = \"0123456789abcdef0123456789abcdef\"\nforward_claims = {{ sub = \"x-user-id\" }}\n{extra}");
        let cfg = Config::parse(&src, "t.toml").unwrap();
        WorkerAuth::new(&cfg, &AuthShared::new(&cfg).unwrap())
    }

    fn token(exp: u64) -> String {
        encode(
            &Header::default(),
            &serde_json::json!({"sub": "alice", "exp": exp}),
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap()
    }

    #[test]
    fn repeated_tokens_come_from_the_cache_until_they_expire() {
        let a = worker("[auth]\ncache_max_ttl = \"1h\"\n[[consumers]]\nname = \"c1\"\njwt_subjects = [\"alice\"]\n");
        let t = token(NOW + 100);
        let first = a.verify_jwt(0, &t, NOW).unwrap();
        let again = a.verify_jwt(0, &t, NOW + 50).unwrap();
        assert!(
            Rc::ptr_eq(&first, &again),
            "the second check is a cache hit"
        );
        assert_eq!(first.consumer.as_ref().unwrap().name.as_ref(), "c1");
        assert_eq!(&*first.headers, b"x-user-id: alice\r\n");
        // Past exp + leeway (30 s) the entry is dropped and the token re-checked: refused.
        assert_eq!(
            a.verify_jwt(0, &t, NOW + 131).unwrap_err(),
            AuthFail::Expired
        );
        // A different token is never served another token's entry.
        let other = token(NOW + 101);
        let o = a.verify_jwt(0, &other, NOW).unwrap();
        assert!(!Rc::ptr_eq(&first, &o));
    }

    #[test]
    fn cache_lifetime_is_capped_by_cache_max_ttl() {
        let a = worker("[auth]\ncache_max_ttl = \"10s\"\n");
        let t = token(NOW + 3600);
        let first = a.verify_jwt(0, &t, NOW).unwrap();
        assert!(Rc::ptr_eq(&first, &a.verify_jwt(0, &t, NOW + 10).unwrap()));
        // Re-verified (a new entry) after the cap, still valid.
        assert!(!Rc::ptr_eq(&first, &a.verify_jwt(0, &t, NOW + 11).unwrap()));
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[auth.jwt.j]\nsecret = \"0123456789abcdef0123456789abcdef\"\n[auth.introspection.i]\nurl = \"http://127.0.0.1:1/\"\nclient_id = \"c\"\nclient_secret = \"hunter2-hunter2\"\n";
        let cfg = Config::parse(src, "t.toml").unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn query_params() {
        let one = |v: &'static [u8]| Some(Ok(v));
        assert_eq!(query_param(b"/a?x=1&api_key=k1&y", b"api_key"), one(b"k1"));
        assert_eq!(query_param(b"/a?my_api_key=k1", b"api_key"), None);
        assert_eq!(query_param(b"/a", b"api_key"), None);
        assert_eq!(query_param(b"/a?api_key=", b"api_key"), one(b""));
        assert_eq!(query_param(b"/a?api_key", b"api_key"), one(b""));
        assert_eq!(
            query_param(b"/a?api%5Fkey=k%2D1", b"api_key"),
            one(b"k%2D1")
        );
        // Two of them, however spelled: which one the upstream reads is its choice.
        assert_eq!(
            query_param(b"/a?api_key=k1&api_key=k2", b"api_key"),
            Some(Err(()))
        );
        assert_eq!(
            query_param(b"/a?api_key=k1&api%5fkey=k2", b"api_key"),
            Some(Err(()))
        );
        // Names as a form decoder reads them; the query ends at a fragment.
        assert_eq!(
            query_param(b"/a?api+key=k1&api%20key=k2", b"api key"),
            Some(Err(()))
        );
        assert_eq!(query_param(b"/a?api_key=k+1", b"api_key"), one(b"k+1"));
        assert_eq!(query_param(b"/a?x=1#&api_key=k1", b"api_key"), None);
        assert_eq!(query_param(b"/a?api_key=k1#x", b"api_key"), one(b"k1"));
    }
}
