//! JWT verification: key sets, the signature check (jsonwebtoken on ring), and the claim rules.
//!
//! The algorithm always comes from the configured key. A token's header only *names* a key
//! (`kid`) and an algorithm that must be one the key already allows: `alg: none` does not
//! parse, an HS256 token against an RSA key fails the family check, and `jku`, `jwk`, `x5u`
//! and `x5c` are never looked at, so a token cannot bring its own key.

use std::collections::BTreeMap;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::config::JwtConfig;
use super::AuthFail;

/// Keys a token may try at most when it names no `kid` (each costs a signature check).
pub const MAX_KEYS_WITHOUT_KID: usize = 4;
/// Longest token looked at.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// One verification key and the algorithms it allows.
#[derive(Clone)]
pub struct JwtKey {
    pub kid: Option<String>,
    /// Each allowed algorithm with its prepared validation (signature only: the claims are
    /// checked by [`check_claims`] against the worker's clock).
    algs: Vec<(Algorithm, Validation)>,
    key: DecodingKey,
    /// A JWKS key's public parameters (`n`/`e`, `crv`/`x`/`y`...): what identifies a key
    /// without a kid from one fetch to the next. `None` for keys not read from a JWK.
    material: Option<AlgorithmParameters>,
}

impl JwtKey {
    pub fn new(kid: Option<String>, algs: &[Algorithm], key: DecodingKey) -> JwtKey {
        JwtKey {
            material: None,
            kid,
            algs: algs
                .iter()
                .map(|a| {
                    let mut v = Validation::new(*a);
                    v.validate_exp = false;
                    v.validate_nbf = false;
                    v.validate_aud = false;
                    v.required_spec_claims.clear();
                    (*a, v)
                })
                .collect(),
            key,
        }
    }

    pub fn algorithms(&self) -> impl Iterator<Item = Algorithm> + '_ {
        self.algs.iter().map(|(a, _)| *a)
    }

    /// Whether `other` is the same key of a JWK Set: the same kid, and for keys without a kid
    /// the same key material (a kid-less key has nothing else that stays the same between
    /// fetches).
    pub fn same_key(&self, other: &JwtKey) -> bool {
        match (&self.kid, &other.kid) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.material.is_some() && self.material == other.material,
            _ => false,
        }
    }
}

/// The RSA algorithms (RFC 7518 §3.3, §3.5): one key family, one stand-in.
const RSA_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

impl JwtKey {
    fn is_rsa(&self) -> bool {
        self.algs.iter().any(|(a, _)| RSA_ALGS.contains(a))
    }

    /// An RSA key's modulus length in bytes, as its JWK gives it (`n`, leading zero bytes
    /// aside); 0 when not known (a PEM key: alone in its set) or not RSA.
    fn modulus_len(&self) -> usize {
        match &self.material {
            Some(AlgorithmParameters::RSA(p)) => {
                decode_base64(&p.n).map_or(0, |n| n.iter().skip_while(|b| **b == 0).count())
            }
            _ => 0,
        }
    }
}

/// A provider's keys at one moment.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<JwtKey>,
    /// What a token no key looked at is checked against when its algorithm is RSA: a copy of
    /// the set's largest RSA key (the first of the largest), allowing every RSA algorithm, its
    /// verdict ignored. An RSA check's cost follows the modulus (a signature of another length
    /// is refused before any arithmetic; one not below the modulus too), so a stand-in of
    /// another size would answer an unknown kid faster, or slower, than the set's own key
    /// answers a wrong signature. Made once with the set (a copy of a public key: no
    /// arithmetic). `None`: no RSA key, and the fixed stand-in serves.
    rsa_stand_in: Option<JwtKey>,
}

impl KeySet {
    pub fn new(keys: Vec<JwtKey>) -> KeySet {
        let mut largest: Option<&JwtKey> = None;
        for k in keys.iter().filter(|k| k.is_rsa()) {
            if largest.is_none_or(|l| k.modulus_len() > l.modulus_len()) {
                largest = Some(k);
            }
        }
        let rsa_stand_in = largest.map(|k| {
            let mut copy = JwtKey::new(None, &RSA_ALGS, k.key.clone());
            copy.material = k.material.clone();
            copy
        });
        KeySet { keys, rsa_stand_in }
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// The claim rules of a provider.
pub struct ClaimRules {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub leeway: u64,
    pub required: Vec<String>,
    /// The header `typ` required, as a full media type (`application/at+jwt`); None: any.
    pub typ: Option<String>,
}

impl ClaimRules {
    pub fn from_config(j: &JwtConfig) -> ClaimRules {
        ClaimRules {
            issuers: j.issuers.clone(),
            audiences: j.audiences.clone(),
            leeway: j.leeway_seconds,
            required: j.required_claims.clone(),
            typ: j.typ.as_deref().map(full_media_type),
        }
    }
}

/// RFC 7515 §4.1.9: a `typ` without a `/` is read with `application/` in front.
fn full_media_type(t: &str) -> String {
    if t.contains('/') {
        t.to_string()
    } else {
        format!("application/{t}")
    }
}

/// Whether a token's header `typ` is the media type `want` (already in full form): media
/// types compare case-insensitively (RFC 2045 §5.1, as RFC 7515 §4.1.9 says), and a value
/// without a `/` stands for `application/` + it. Allocates nothing.
fn typ_matches(got: &str, want: &str) -> bool {
    const APP: &[u8] = b"application/";
    let (got, want) = (got.as_bytes(), want.as_bytes());
    if got.contains(&b'/') {
        got.eq_ignore_ascii_case(want)
    } else {
        want.len() == APP.len() + got.len()
            && want[..APP.len()].eq_ignore_ascii_case(APP)
            && want[APP.len()..].eq_ignore_ascii_case(got)
    }
}

/// A token whose signature verified and whose claims passed the rules.
#[derive(Debug)]
pub struct Claims {
    pub map: Map<String, Value>,
    /// `exp`, when the token has one.
    pub exp: Option<u64>,
}

pub fn parse_alg(s: &str) -> Result<Algorithm, String> {
    s.parse::<Algorithm>().map_err(|_| {
        format!("unknown algorithm {s:?} (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)")
    })
}

fn is_hmac(a: Algorithm) -> bool {
    matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn min_secret(a: Algorithm) -> usize {
    match a {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// Checks what can be checked without reading files. Errors: (sub-key, reason).
pub fn check_config(j: &JwtConfig) -> Result<(), (String, String)> {
    let sources = [
        j.secret.is_some(),
        j.secret_base64.is_some(),
        j.public_key_file.is_some(),
        j.jwks_file.is_some(),
        j.jwks_url.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if sources != 1 {
        return Err((
            "secret".into(),
            "give exactly one key source: secret, secret_base64, public_key_file, jwks_file or jwks_url".into(),
        ));
    }
    if let Some(a) = &j.algorithm {
        parse_alg(a).map_err(|e| ("algorithm".to_string(), e))?;
    }
    for a in &j.algorithms {
        parse_alg(a).map_err(|e| ("algorithms".to_string(), e))?;
    }
    if j.public_key_file.is_some() && j.algorithm.is_none() {
        return Err((
            "algorithm".into(),
            "a public_key_file needs its algorithm (RS256, PS256, ES256, EdDSA...)".into(),
        ));
    }
    if let Some(u) = &j.jwks_url {
        // The URL resolves and an https one's CA bundle loads.
        super::jwks::Endpoint::load(u, j.ca.as_deref(), "jwks_url")?;
        if j.jwks_max_ttl() < j.jwks_min_ttl() {
            return Err((
                "jwks_max_ttl".into(),
                "must be at least jwks_min_ttl".into(),
            ));
        }
    } else {
        // Settings that would be silently ignored are refused.
        let url_only = [
            ("jwks_min_ttl", j.jwks_min_ttl.is_some()),
            ("jwks_max_ttl", j.jwks_max_ttl.is_some()),
            (
                "jwks_min_refresh_interval",
                j.jwks_min_refresh_interval.is_some(),
            ),
            ("jwks_grace", j.jwks_grace.is_some()),
            ("jwks_timeout", j.jwks_timeout.is_some()),
            ("ca", j.ca.is_some()),
        ];
        if let Some((k, _)) = url_only.iter().find(|(_, set)| *set) {
            return Err((k.to_string(), "only applies to a jwks_url provider".into()));
        }
    }
    let key_set = j.jwks_file.is_some() || j.jwks_url.is_some();
    if key_set && j.algorithm.is_some() {
        return Err((
            "algorithm".into(),
            "a key set's algorithms come from its keys; use `algorithms` to restrict them".into(),
        ));
    }
    if key_set && j.kid.is_some() {
        return Err((
            "kid".into(),
            "the keys of a key set carry their own kid".into(),
        ));
    }
    if !key_set && !j.algorithms.is_empty() {
        return Err((
            "algorithms".into(),
            "only for jwks_file / jwks_url; a single key takes `algorithm`".into(),
        ));
    }
    if let Some(t) = &j.typ {
        // A media type without parameters (RFC 6838 §4.2): type/subtype, or the subtype alone.
        let name = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        let ok = match t.split_once('/') {
            Some((ty, sub)) => name(ty) && name(sub),
            None => name(t),
        };
        if !ok {
            return Err((
                "typ".into(),
                format!("{t:?} is not a media type such as \"at+jwt\" or \"application/at+jwt\" (RFC 7515 §4.1.9)"),
            ));
        }
    }
    for (claim, h) in &j.forward_claims {
        if claim.is_empty() {
            return Err(("forward_claims".into(), "empty claim name".into()));
        }
        if h.0 == "authorization" || h.0 == "host" {
            return Err((
                "forward_claims".into(),
                format!("{:?} cannot carry a claim", h.0),
            ));
        }
    }
    Ok(())
}

/// Loads a provider's key set from its inline secret, PEM file or JWKS file. Errors name the
/// sub-key and the reason, never the secret.
pub fn load_static(j: &JwtConfig) -> Result<KeySet, (String, String)> {
    let alg = match &j.algorithm {
        Some(a) => Some(parse_alg(a).map_err(|e| ("algorithm".to_string(), e))?),
        None => None,
    };
    let secret = |raw: Vec<u8>, key: &str| -> Result<KeySet, (String, String)> {
        let a = alg.unwrap_or(Algorithm::HS256);
        if !is_hmac(a) {
            return Err((
                "algorithm".into(),
                format!("a secret is for HS256/384/512, not {a:?}"),
            ));
        }
        if raw.len() < min_secret(a) {
            return Err((
                key.into(),
                format!(
                    "{a:?} needs a secret of at least {} bytes (RFC 7518 §3.2); this one has {}",
                    min_secret(a),
                    raw.len()
                ),
            ));
        }
        Ok(KeySet::new(vec![JwtKey::new(
            j.kid.clone(),
            &[a],
            DecodingKey::from_secret(&raw),
        )]))
    };
    if let Some(s) = &j.secret {
        return secret(s.0.as_bytes().to_vec(), "secret");
    }
    if let Some(s) = &j.secret_base64 {
        return secret(
            decode_base64(&s.0).map_err(|e| ("secret_base64".to_string(), e))?,
            "secret_base64",
        );
    }
    if let Some(path) = &j.public_key_file {
        let a = alg.expect("checked: public_key_file has an algorithm");
        let pem = std::fs::read(path).map_err(|e| {
            (
                "public_key_file".to_string(),
                format!("cannot read {path:?}: {e}"),
            )
        })?;
        let key = match a {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
            _ => {
                return Err((
                    "algorithm".into(),
                    format!("{a:?} uses a secret, not a public_key_file"),
                ))
            }
        }
        .map_err(|e| {
            (
                "public_key_file".to_string(),
                format!("{path:?} is not a PEM public key for {a:?}: {e}"),
            )
        })?;
        if RSA_ALGS.contains(&a) {
            if let Some(why) = pem_rsa_bits(&pem).and_then(rsa_size_error) {
                return Err(("public_key_file".to_string(), format!("{path:?}: {why}")));
            }
        }
        return Ok(KeySet::new(vec![JwtKey::new(j.kid.clone(), &[a], key)]));
    }
    if let Some(path) = &j.jwks_file {
        let text = std::fs::read(path).map_err(|e| {
            (
                "jwks_file".to_string(),
                format!("cannot read {path:?}: {e}"),
            )
        })?;
        return parse_jwks(&text, &allowed_algs(j), JwksOrigin::File)
            .map(|(set, _)| set)
            .map_err(|e| ("jwks_file".to_string(), format!("{path:?}: {e}")));
    }
    Err(("jwks_url".into(), "is fetched in the background".into()))
}

/// The provider's `algorithms` allow-list (empty: any that a key names or implies).
pub fn allowed_algs(j: &JwtConfig) -> Vec<Algorithm> {
    j.algorithms
        .iter()
        .filter_map(|a| parse_alg(a).ok())
        .collect()
}

/// The RSA modulus sizes a key may have: RFC 7518 §3.3 and §3.5 require at least 2048 bits
/// for RS* and PS*, and ring, which checks the signatures, takes at most 8192.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// Why an RSA key whose modulus has `bits` bits can verify no signature, if it cannot.
fn rsa_size_error(bits: usize) -> Option<String> {
    if bits < RSA_MIN_BITS {
        Some(format!(
            "an RSA key of {bits} bits is too short: RS* and PS* need at least {RSA_MIN_BITS} \
             (RFC 7518 §3.3, §3.5), and no token would verify with it"
        ))
    } else if bits > RSA_MAX_BITS {
        Some(format!(
            "an RSA key of {bits} bits is longer than the {RSA_MAX_BITS} bits signatures are \
             checked with, and no token would verify with it"
        ))
    } else {
        None
    }
}

/// A big-endian unsigned integer without its leading zero octets.
fn unsigned(b: &[u8]) -> &[u8] {
    &b[b.iter().position(|x| *x != 0).unwrap_or(b.len())..]
}

/// An elliptic-curve coordinate as `size` octets, zeros put back in front; `None` when its
/// value does not fit.
fn coordinate(b: &[u8], size: usize) -> Option<Vec<u8>> {
    let b = unsigned(b);
    let pad = size.checked_sub(b.len())?;
    let mut out = vec![0u8; pad];
    out.extend_from_slice(b);
    Some(out)
}

/// The bit length of a big-endian unsigned integer.
fn bit_len(b: &[u8]) -> usize {
    let b = unsigned(b);
    b.first()
        .map_or(0, |f| b.len() * 8 - f.leading_zeros() as usize)
}

/// The modulus size in bits of the RSA public key in the first block of `pem` (`PUBLIC KEY`,
/// `RSA PUBLIC KEY` or a `CERTIFICATE`'s); `None` when it cannot be read here (the key
/// loader then judges the file alone).
fn pem_rsa_bits(pem: &[u8]) -> Option<usize> {
    use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo};
    use x509_parser::public_key::{PublicKey, RSAPublicKey};
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let spki_bits = |spki: &SubjectPublicKeyInfo<'_>| match spki.parsed() {
        Ok(PublicKey::RSA(k)) => Some(bit_len(k.modulus)),
        _ => None,
    };
    match block.label.as_str() {
        "PUBLIC KEY" => spki_bits(&SubjectPublicKeyInfo::from_der(&block.contents).ok()?.1),
        "RSA PUBLIC KEY" => Some(bit_len(
            RSAPublicKey::from_der(&block.contents).ok()?.1.modulus,
        )),
        "CERTIFICATE" => spki_bits(block.parse_x509().ok()?.public_key()),
        _ => None,
    }
}

fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let t = s.trim();
    base64::engine::general_purpose::STANDARD
        .decode(t)
        .or_else(|_| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.trim_end_matches('='))
        })
        .map_err(|_| "is not valid base64".to_string())
}

/// Where a JWK Set comes from; symmetric (`oct`) keys are treated differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwksOrigin {
    /// `jwks_file`: part of the config. A symmetric key shorter than its algorithm's hash
    /// is a config error, as for `secret`.
    File,
    /// `jwks_url`: a document published over HTTP, normally readable by anyone. Symmetric
    /// keys are never used from it (whoever reads the set could sign tokens with them); each
    /// is skipped with a note for the log.
    Url,
}

/// A key of a set, for messages: its position and kid (escaped and cut: a fetched set is
/// not trusted to hold printable or short text).
fn key_label(i: usize, kid: Option<&str>) -> String {
    match kid {
        Some(k) => {
            let mut k: String = k.chars().take(64).collect();
            if k.len() < kid.map_or(0, str::len) {
                k.push_str("...");
            }
            format!("key {i} (kid {k:?})")
        }
        None => format!("key {i} (no kid)"),
    }
}

/// Parses a JWK Set. Keys not meant to verify signatures (`use` other than "sig", `key_ops`
/// without "verify"), of unsupported types or without a usable algorithm are skipped; a set
/// with no usable key is an error. Symmetric keys follow `origin` (see [`JwksOrigin`]): from
/// a file, one shorter than its algorithm's hash output (RFC 7518 §3.2) fails the whole set;
/// from a URL, each is skipped and named in the notes returned beside the set.
pub fn parse_jwks(
    text: &[u8],
    allowed: &[Algorithm],
    origin: JwksOrigin,
) -> Result<(KeySet, Vec<String>), String> {
    let (set, notes) = parse_jwk_set(text, allowed, origin)?;
    if set.keys.is_empty() {
        return Err(no_usable_key(&notes));
    }
    Ok((set, notes))
}

/// Why a well-formed set gave no key, for the log.
pub fn no_usable_key(notes: &[String]) -> String {
    match notes.first() {
        Some(n) => format!("the set holds no usable signature key ({n})"),
        None => "the set holds no usable signature key".into(),
    }
}

/// [`parse_jwks`], with a well-formed JWK Set (a `keys` array) that holds no usable key given
/// back empty rather than as an error: a key server's answer that no key of the provider is
/// in the set any more.
pub fn parse_jwk_set(
    text: &[u8],
    allowed: &[Algorithm],
    origin: JwksOrigin,
) -> Result<(KeySet, Vec<String>), String> {
    let v: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| "not a JWK Set: no \"keys\" array".to_string())?;
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let Ok(mut jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
            continue;
        };
        // RFC 7517 §4.2: a key whose `use` is not "sig" is not for signatures.
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            continue;
        }
        // RFC 7517 §4.3: with `key_ops`, only a key listing "verify" verifies.
        if jwk
            .common
            .key_operations
            .as_ref()
            .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
        {
            continue;
        }
        let mut algs = jwk_algs(&jwk);
        if !allowed.is_empty() {
            algs.retain(|a| allowed.contains(a));
        }
        if algs.is_empty() {
            continue;
        }
        if let AlgorithmParameters::OctetKey(p) = &jwk.algorithm {
            let label = || key_label(i, jwk.common.key_id.as_deref());
            if origin == JwksOrigin::Url {
                notes.push(format!(
                    "{}: a symmetric (oct) key in a fetched JWK Set is not used (anyone who can \
                     read the set could sign tokens with it)",
                    label()
                ));
                continue;
            }
            // RFC 7518 §3.2: an HMAC key at least as long as the hash output.
            let len = decode_base64(&p.value).map_or(0, |k| k.len());
            if let Some(a) = algs.iter().find(|a| len < min_secret(**a)) {
                return Err(format!(
                    "{}: {a:?} needs a key of at least {} bytes (RFC 7518 §3.2); this one has {len}",
                    label(),
                    min_secret(*a)
                ));
            }
        }
        let key = if let AlgorithmParameters::RSA(p) = &mut jwk.algorithm {
            // RFC 7518 §6.3.1.1: `n` and `e` are unsigned integers. Some libraries put a zero
            // octet before them (a 257-octet `n` for a 2048-bit key), which ring's parser
            // refuses: read them as the numbers they are, so that such a key verifies.
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let (Ok(n), Ok(e)) = (b64.decode(&p.n), b64.decode(&p.e)) else {
                continue;
            };
            let (n, e) = (unsigned(&n), unsigned(&e));
            if let Some(why) = rsa_size_error(bit_len(n)) {
                let label = key_label(i, jwk.common.key_id.as_deref());
                if origin == JwksOrigin::File {
                    return Err(format!("{label}: {why}"));
                }
                notes.push(format!("{label}: {why}; it is not used"));
                continue;
            }
            let key = DecodingKey::from_rsa_raw_components(n, e);
            // The material kid-less keys are matched by across fetches, written one way.
            (p.n, p.e) = (b64.encode(n), b64.encode(e));
            key
        } else if let AlgorithmParameters::EllipticCurve(p) = &mut jwk.algorithm {
            // RFC 7518 §6.2.1.2: `x` and `y` are the coordinates in the curve's full size
            // (32 octets for P-256, 48 for P-384). Some signers drop leading zero octets
            // (about one key in 128): pad them back, as the numbers are the same, rather
            // than build a point that never verifies.
            let size = match p.curve {
                EllipticCurve::P256 => 32,
                EllipticCurve::P384 => 48,
                _ => continue,
            };
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let (Ok(x), Ok(y)) = (b64.decode(&p.x), b64.decode(&p.y)) else {
                continue;
            };
            let (Some(x), Some(y)) = (coordinate(&x, size), coordinate(&y, size)) else {
                continue;
            };
            (p.x, p.y) = (b64.encode(&x), b64.encode(&y));
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            key
        } else {
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            key
        };
        let mut key = JwtKey::new(jwk.common.key_id.clone(), &algs, key);
        key.material = Some(jwk.algorithm);
        out.push(key);
    }
    Ok((KeySet::new(out), notes))
}

/// The algorithms a JWK allows: its `alg`, else what its type and curve imply (RSA keys
/// without `alg`: RS256 only; symmetric keys must name theirs).
fn jwk_algs(jwk: &Jwk) -> Vec<Algorithm> {
    if let Some(a) = jwk.common.key_algorithm {
        let named = match a {
            KeyAlgorithm::HS256 => Some(Algorithm::HS256),
            KeyAlgorithm::HS384 => Some(Algorithm::HS384),
            KeyAlgorithm::HS512 => Some(Algorithm::HS512),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::ES384 => Some(Algorithm::ES384),
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::RS384 => Some(Algorithm::RS384),
            KeyAlgorithm::RS512 => Some(Algorithm::RS512),
            KeyAlgorithm::PS256 => Some(Algorithm::PS256),
            KeyAlgorithm::PS384 => Some(Algorithm::PS384),
            KeyAlgorithm::PS512 => Some(Algorithm::PS512),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            _ => None,
        };
        // The named algorithm must fit the key's type, or the key is skipped.
        return match (named, &jwk.algorithm) {
            (Some(a), AlgorithmParameters::OctetKey(_)) if is_hmac(a) => vec![a],
            (
                Some(
                    a @ (Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512),
                ),
                AlgorithmParameters::RSA(_),
            ) => vec![a],
            (Some(Algorithm::ES256), AlgorithmParameters::EllipticCurve(p))
                if p.curve == EllipticCurve::P256 =>
            {
                vec![Algorithm::ES256]
            }
            (Some(Algorithm::ES384), AlgorithmParameters::EllipticCurve(p))
                if p.curve == EllipticCurve::P384 =>
            {
                vec![Algorithm::ES384]
            }
            (Some(Algorithm::EdDSA), AlgorithmParameters::OctetKeyPair(p))
                if p.curve == EllipticCurve::Ed25519 =>
            {
                vec![Algorithm::EdDSA]
            }
            _ => Vec::new(),
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![Algorithm::RS256],
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            vec![Algorithm::ES256]
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
            vec![Algorithm::ES384]
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        _ => Vec::new(),
    }
}

/// What went wrong with one key. jsonwebtoken checks the signature before it reads the
/// claims, so only a claims set that does not decode (JSON, UTF-8) is the token's form and
/// not its signature; anything else this key refused (a signature that is not base64url, one
/// of the wrong length) is a failed signature. Calling those "malformed" would tell a client
/// that the token's `kid` named a key, since a kid that names none is refused as unknown
/// whatever its signature (checked against a stand-in only, see [`check_stand_in`]).
fn key_error(e: &jsonwebtoken::errors::Error) -> AuthFail {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
            AuthFail::AlgorithmNotAllowed
        }
        K::Json(_) | K::Utf8(_) => AuthFail::Malformed,
        _ => AuthFail::BadSignature,
    }
}

/// Verifies a compact JWS against `keys` and checks its claims at time `now` (Unix seconds).
pub fn verify(
    token: &str,
    keys: &KeySet,
    rules: &ClaimRules,
    now: u64,
) -> Result<Claims, AuthFail> {
    if token.len() > MAX_TOKEN_BYTES || token.bytes().filter(|b| *b == b'.').count() != 2 {
        return Err(AuthFail::Malformed);
    }
    // `alg: none` and unknown algorithms fail here: the header does not parse.
    let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFail::Malformed)?;
    if has_crit(token) {
        return Err(AuthFail::Malformed);
    }
    // RFC 8725 §3.11, RFC 9068 §4: a provider that requires a type refuses tokens of another
    // kind (an ID token, a logout token) of the same issuer and keys, and those without one.
    if let Some(want) = &rules.typ {
        if !header.typ.as_deref().is_some_and(|t| typ_matches(t, want)) {
            return Err(AuthFail::WrongType);
        }
    }
    // RFC 7515 §4.1.4, RFC 7517 §4.5: a kid that names a key of the set picks that key, and
    // only it is tried. A kid that names none leaves the keys without a kid as candidates
    // (an issuer may publish keys without kids); if none of them verifies, the token's key is
    // unknown, whatever they answered, so that a JWKS URL provider fetches the set again.
    let named = header.kid.as_deref().filter(|k| keys.has_kid(k));
    let mut result = Err(AuthFail::UnknownKey);
    let mut tried = 0;
    for k in &keys.keys {
        match (named, &header.kid, &k.kid) {
            (Some(want), _, Some(have)) if want == have => {}
            (Some(_), _, _) | (None, Some(_), Some(_)) => continue,
            // Keys tried without a kid's choice: each costs a signature check, so at most a
            // few.
            _ => {
                if tried == MAX_KEYS_WITHOUT_KID {
                    break;
                }
            }
        }
        let Some((_, validation)) = k.algs.iter().find(|(a, _)| *a == header.alg) else {
            if result == Err(AuthFail::UnknownKey) {
                result = Err(AuthFail::AlgorithmNotAllowed);
            }
            continue;
        };
        tried += 1;
        match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, validation) {
            Ok(data) => {
                result = Ok(data.claims);
                break;
            }
            Err(e) => result = Err(key_error(&e)),
        }
    }
    if tried == 0 {
        // No key looked at the signature (a kid that names no key, an algorithm no candidate
        // allows): one check against a stand-in key of the named algorithm, its result
        // ignored, so that the refusal costs what a wrong signature costs and its timing does
        // not tell which kids exist.
        check_stand_in(token, header.alg, keys);
    }
    let map = match result {
        Ok(m) => m,
        Err(_) if header.kid.is_some() && named.is_none() => return Err(AuthFail::UnknownKey),
        Err(f) => return Err(f),
    };
    check_claims(map, rules, now)
}

/// Public keys no token is ever verified with: the stand-ins that [`check_stand_in`] checks a
/// signature against when no configured key did (generated for this purpose; RSA of 2048
/// bits, as most issuers use). Their private halves are in `tests/data/auth/stand_in_*`, and
/// whatever a stand-in says about a token is thrown away.
const STAND_IN_RSA: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA5Wr/0iOaQe+ncsXoUDPA
QEyIpnxuGorDEBOuA93T3YeO6bqKlVRt+cgNe4sYQ4k02aL0gn5UOk4p/FS/l/cp
mlfo7fcsjEOn/41KDzT+ACmuF4epGldZJbYNWbcWHriUXGKIFS7gHE9tJ6aQlTtt
YiDwU4W4Ej5/kU2PsOBz67IvHq02eIU7LKZEoQ6SfxyGjS4jdF4JWVN1oQbcf2jq
Rlrp9hMGjPl9ivh+dZp7x75HnOVTHPlRdr3O26bQKvaPRrh4ApnAWg3+GW5aDirb
4IqMIvjnSvLwm5xXtnnXjZsN14CcB0zwoKCk8JYYeVXae8KWHp3wJjDRfPfjXIxT
RQIDAQAB
-----END PUBLIC KEY-----\n";
const STAND_IN_EC256: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELvBIF3k3pGJSMytJxIeDoxcLy15Y
Eb9R583J4HrBwuBUXJ9afspKfIzqgUmJMT5FSwY7z6X7l3MyStX7vKBXjA==
-----END PUBLIC KEY-----\n";
const STAND_IN_EC384: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE+VQCNz304n4hQMsAoMGf1Uyn9xJA1ktm
GsNmF54X4BsIo8sdMCnL+sJkhIdEaGNz7TrcYPXJbBwCvnVLjrgrX20Ywi5KrYwM
MXqTacqvI477a04ZJ3fEPKr+2NJAhgky
-----END PUBLIC KEY-----\n";
const STAND_IN_ED25519: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA/znc/C22B0uPKz/DlvRUAhuW+uBebP1Rd+4L5Ut59HM=
-----END PUBLIC KEY-----\n";
/// A fixed secret for the HMAC algorithms (64 bytes: HS512's hash).
const STAND_IN_SECRET: [u8; 64] = [0x5a; 64];

thread_local! {
    /// The stand-in keys, one per family, each allowing its family's algorithms; made once per
    /// worker (a thread's own: no lock or atomic on the request path, and no worker waits on
    /// another's parse), on the first token that needs one.
    static STAND_INS: Vec<JwtKey> = stand_ins();
}

/// The stand-in keys ([`STAND_INS`]).
fn stand_ins() -> Vec<JwtKey> {
    use Algorithm as A;
    let pem = [
        (
            &[A::RS256, A::RS384, A::RS512, A::PS256, A::PS384, A::PS512][..],
            DecodingKey::from_rsa_pem(STAND_IN_RSA.as_bytes()),
        ),
        (
            &[A::ES256][..],
            DecodingKey::from_ec_pem(STAND_IN_EC256.as_bytes()),
        ),
        (
            &[A::ES384][..],
            DecodingKey::from_ec_pem(STAND_IN_EC384.as_bytes()),
        ),
        (
            &[A::EdDSA][..],
            DecodingKey::from_ed_pem(STAND_IN_ED25519.as_bytes()),
        ),
    ];
    let mut keys = vec![JwtKey::new(
        None,
        &[A::HS256, A::HS384, A::HS512],
        DecodingKey::from_secret(&STAND_IN_SECRET),
    )];
    // The constants parse (`stand_ins_verify_their_own_signatures`); were one not to, its
    // algorithms would go without a stand-in rather than fail a request.
    keys.extend(
        pem.into_iter()
            .filter_map(|(algs, key)| key.ok().map(|k| JwtKey::new(None, algs, k))),
    );
    keys
}

/// The stand-in key for `alg` among `keys`, with its prepared validation.
fn stand_in(keys: &[JwtKey], alg: Algorithm) -> Option<(&DecodingKey, &Validation)> {
    keys.iter().find_map(|k| {
        let (_, v) = k.algs.iter().find(|(a, _)| *a == alg)?;
        Some((&k.key, v))
    })
}

#[cfg(test)]
thread_local! {
    /// Stand-in checks made on this thread, for the tests.
    static STAND_IN_CHECKS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Checks `token`'s signature against the stand-in key of `alg`: the same work (decoding,
/// one signature check of that algorithm) as a configured key's refusal, no more allocated.
/// For an RSA algorithm that is the set's own stand-in ([`KeySet::new`]), when it has one.
/// Whether it verified: only the tests look.
fn check_stand_in(token: &str, alg: Algorithm, set: &KeySet) -> bool {
    #[cfg(test)]
    STAND_IN_CHECKS.with(|c| c.set(c.get() + 1));
    if let Some(k) = &set.rsa_stand_in {
        if let Some((_, v)) = k.algs.iter().find(|(a, _)| *a == alg) {
            return jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, v).is_ok();
        }
    }
    STAND_INS.with(|keys| {
        stand_in(keys, alg).is_some_and(|(key, v)| {
            jsonwebtoken::decode::<Map<String, Value>>(token, key, v).is_ok()
        })
    })
}

/// Does the header carry `crit`? No extension is understood here, so such a token must be
/// refused (RFC 7515 §4.1.11); jsonwebtoken's header type drops the field.
fn has_crit(token: &str) -> bool {
    use base64::Engine;
    let first = token.split('.').next().unwrap_or("");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first)
        .ok()
        .and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
        .is_none_or(|h| h.contains_key("crit"))
}

/// exp/nbf with leeway, iat's type, iss, aud, required claims.
pub fn check_claims(
    map: Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
) -> Result<Claims, AuthFail> {
    // A fraction of a second (NumericDate allows one, RFC 7519 §2) is rounded to the safe
    // side: `exp` and `iat` down, `nbf` up (a token is not valid before the whole second
    // after its `nbf`), as introspection answers are read (`introspect::answer_nbf`).
    let num = |name: &str, up: bool| -> Result<Option<u64>, AuthFail> {
        match map.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| *f >= 0.0)
                        // `as` saturates: a value past u64 stays the largest.
                        .map(|f| if up { f.ceil() } else { f } as u64)
                })
                .map(Some)
                .ok_or(AuthFail::Malformed),
        }
    };
    // RFC 7519 §4.1.4-4.1.6: `exp`, `nbf` and `iat` are NumericDates. One of another type (a
    // string, an object, null...) or negative makes the token invalid, not absent: `iat` is
    // not otherwise judged, but a token whose time claims cannot be read is no token to trust
    // (jsonwebtoken reads only `exp` and `nbf`, and those checks are off here).
    let exp = num("exp", false)?;
    let nbf = num("nbf", true)?;
    num("iat", false)?;
    // A claim whose value is JSON null says nothing (RFC 7519 §4: a claim's value is what
    // the token asserts; null asserts no value): it is as absent as a missing one.
    for r in &rules.required {
        if map.get(r).is_none_or(Value::is_null) {
            return Err(AuthFail::MissingClaim);
        }
    }
    if let Some(e) = exp {
        if now > e.saturating_add(rules.leeway) {
            return Err(AuthFail::Expired);
        }
    }
    if let Some(n) = nbf {
        if now.saturating_add(rules.leeway) < n {
            return Err(AuthFail::NotYetValid);
        }
    }
    if !rules.issuers.is_empty() {
        let ok = map
            .get("iss")
            .and_then(Value::as_str)
            .is_some_and(|i| rules.issuers.iter().any(|x| x == i));
        if !ok {
            return Err(AuthFail::WrongIssuer);
        }
    }
    if !rules.audiences.is_empty() {
        let ok = match map.get("aud") {
            Some(Value::String(a)) => rules.audiences.iter().any(|x| x == a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| rules.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !ok {
            return Err(AuthFail::WrongAudience);
        }
    }
    Ok(Claims { map, exp })
}

/// The values of a claim holding a list: an array of strings or a space-separated string.
pub fn claim_list(map: &Map<String, Value>, name: &str) -> Vec<Box<str>> {
    match map.get(name) {
        Some(Value::String(s)) => s
            .split(' ')
            .filter(|x| !x.is_empty())
            .map(Into::into)
            .collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(Into::into).collect(),
        _ => Vec::new(),
    }
}

/// A claim as header text: strings as they are, numbers and booleans as JSON, arrays of those
/// joined by commas. `None` for objects and for values a header cannot carry (CR, LF, NUL and
/// other control characters).
pub fn claim_header_value(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(a) => {
            let parts: Option<Vec<String>> = a
                .iter()
                .map(|x| match x {
                    Value::Array(_) | Value::Object(_) | Value::Null => None,
                    x => claim_header_value(x),
                })
                .collect();
            parts?.join(",")
        }
        Value::Object(_) | Value::Null => return None,
    };
    if s.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) || s.len() > 4096 {
        return None;
    }
    Some(s)
}

/// Forwarded-claim settings: claim name -> header name.
pub type ForwardClaims = BTreeMap<String, crate::config::HeaderName>;

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn rules() -> ClaimRules {
        ClaimRules {
            issuers: vec!["https://idp.test".into()],
            audiences: vec!["api".into()],
            leeway: 30,
            required: vec!["exp".into(), "sub".into()],
            typ: None,
        }
    }

    /// RFC 7519 §2: a NumericDate may hold a fraction of a second. `nbf` is rounded up (the
    /// token is not valid before the whole second after it), `exp` down, as introspection
    /// answers are read. Before, `nbf` was rounded down: a token valid from `NOW + 30.5` was
    /// taken at `NOW` with 30 s of leeway, half a second early.
    #[test]
    fn rfc7519_2_fractional_nbf_rounds_up_and_exp_down() {
        let map = |v: Value| v.as_object().expect("object").clone();
        let early = json!({"sub": "a", "iss": "https://idp.test", "aud": "api", "exp": NOW + 600, "nbf": NOW as f64 + 30.5});
        assert_eq!(
            check_claims(map(early.clone()), &rules(), NOW).unwrap_err(),
            AuthFail::NotYetValid
        );
        assert!(check_claims(map(early), &rules(), NOW + 1).is_ok());
        let late =
            json!({"sub": "a", "iss": "https://idp.test", "aud": "api", "exp": NOW as f64 - 29.5});
        assert!(check_claims(map(late.clone()), &rules(), NOW).is_ok());
        // Expired (with its leeway) at NOW + 0.5: no longer valid in the second after.
        assert_eq!(
            check_claims(map(late), &rules(), NOW + 1).unwrap_err(),
            AuthFail::Expired
        );
    }

    fn claims() -> Value {
        json!({"sub": "alice", "iss": "https://idp.test", "aud": "api", "exp": NOW + 600, "scope": "read write"})
    }

    fn data(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/data/auth/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// RFC 7518 §3.3: an RSA key under 2048 bits fails a jwks_file and is skipped, with a
    /// note, from a fetched set; a modulus with zero octets in front counts by its value.
    #[test]
    fn rfc7518_3_3_rsa_key_sizes_in_a_set() {
        let key = |f: &str| -> Value { serde_json::from_slice(&data(f)).unwrap() };
        let set = serde_json::json!({"keys": [key("rsa_jwk.json"), key("rsa1024_jwk.json")]});
        let text = set.to_string();
        let e = parse_jwks(text.as_bytes(), &[], JwksOrigin::File)
            .err()
            .unwrap();
        assert!(
            e.contains("kid \"rsa1024\"") && e.contains("1024 bits"),
            "{e}"
        );
        let (got, notes) = parse_jwks(text.as_bytes(), &[], JwksOrigin::Url).unwrap();
        assert_eq!(got.keys.len(), 1);
        assert_eq!(got.keys[0].kid.as_deref(), Some("rsa"));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("1024 bits"), "{notes:?}");
        assert_eq!(bit_len(&[0, 0, 1, 0]), 9);
        assert_eq!(bit_len(&[0]), 0);
        assert!(rsa_size_error(2047).is_some());
        assert!(rsa_size_error(2048).is_none() && rsa_size_error(8192).is_none());
        assert!(rsa_size_error(8193).is_some());
        assert_eq!(pem_rsa_bits(&data("rsa1024_public.pem")), Some(1024));
        assert_eq!(pem_rsa_bits(&data("rsa_public.pem")), Some(2048));
        assert_eq!(pem_rsa_bits(&data("ec256_public.pem")), None);
        assert_eq!(coordinate(&[0, 0, 7], 2), Some(vec![0, 7]));
        assert_eq!(coordinate(&[7], 3), Some(vec![0, 0, 7]));
        assert_eq!(coordinate(&[1, 2, 3], 2), None);
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hs_set() -> KeySet {
        KeySet::new(vec![JwtKey::new(
            None,
            &[Algorithm::HS256],
            DecodingKey::from_secret(SECRET),
        )])
    }

    fn hs_token(c: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            c,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn b64(s: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    /// RFC 7515 Appendix A.1: the HS256 example, key and token from the RFC. Its `exp`
    /// (1300819380) is long past: verified with the clock set before it, and refused as
    /// expired with today's clock.
    #[test]
    fn rfc7515_a1_hs256_example() {
        let k = "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow";
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let jwks = json!({"keys": [{"kty": "oct", "alg": "HS256", "k": k}]}).to_string();
        let set = parse_jwks(jwks.as_bytes(), &[], JwksOrigin::File)
            .unwrap()
            .0;
        let r = ClaimRules {
            issuers: vec!["joe".into()],
            audiences: vec![],
            leeway: 0,
            required: vec!["exp".into()],
            typ: None,
        };
        let c = verify(token, &set, &r, 1_300_819_000).expect("the RFC's signature verifies");
        assert_eq!(c.exp, Some(1_300_819_380));
        assert_eq!(c.map["http://example.com/is_root"], json!(true));
        assert_eq!(verify(token, &set, &r, NOW).unwrap_err(), AuthFail::Expired);
        // One changed signature byte.
        let bad = format!("{}Y", &token[..token.len() - 1]);
        assert_eq!(
            verify(&bad, &set, &r, 1_300_819_000).unwrap_err(),
            AuthFail::BadSignature
        );
    }

    /// RFC 7520 §4.1: RS256 signature by the RFC's RSA key (public part typed in as a JWKS).
    #[test]
    fn rfc7520_4_1_rs256_example() {
        let n = "n4EPtAOCc9AlkeQHPzHStgAbgs7bTZLwUBZdR8_KuKPEHLd4rHVTeT-O-XV2jRojdNhxJWTDvNd7nqQ0VEiZQHz_AJmSCpMaJMRBSFKrKb2wqVwGU_NsYOYL-QtiWN2lbzcEe6XC0dApr5ydQLrHqkHHig3RBordaZ6Aj-oBHqFEHYpPe7Tpe-OfVfHd1E6cS6M1FZcD1NNLYD5lFHpPI9bTwJlsde3uhGqC0ZCuEHg8lhzwOHrtIQbS0FVbb9k3-tVTU4fg_3L_vniUFAKwuCLqKnS2BYwdq_mzSnbLY7h_qixoR7jig3__kRhuaxwUkRz5iaiQkqgc5gHdrNP5zw";
        let jwks = json!({"keys": [{"kty": "RSA", "kid": "bilbo.baggins@hobbiton.example", "use": "sig", "n": n, "e": "AQAB"}]}).to_string();
        let set = parse_jwks(jwks.as_bytes(), &[], JwksOrigin::File)
            .unwrap()
            .0;
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZXhhbXBsZSJ9.SXTigJlzIGEgZGFuZ2Vyb3VzIGJ1c2luZXNzLCBGcm9kbywgZ29pbmcgb3V0IHlvdXIgZG9vci4gWW91IHN0ZXAgb250byB0aGUgcm9hZCwgYW5kIGlmIHlvdSBkb24ndCBrZWVwIHlvdXIgZmVldCwgdGhlcmXigJlzIG5vIGtub3dpbmcgd2hlcmUgeW91IG1pZ2h0IGJlIHN3ZXB0IG9mZiB0by4.MRjdkly7_-oTPTS3AXP41iQIGKa80A0ZmTuV5MEaHoxnW2e5CZ5NlKtainoFmKZopdHM1O2U4mwzJdQx996ivp83xuglII7PNDi84wnB-BDkoBwA78185hX-Es4JIwmDLJK3lfWRa-XtL0RnltuYv746iYTh_qHRD68BNt1uSNCrUCTJDt5aAE6x8wW1Kt9eRo4QPocSadnHXFxnt8Is9UzpERV0ePPQdLuW3IS_de3xyIrDaLGdjluPxUAhb6L2aXic1U12podGU0KLUQSE_oI-ZnmKJ3F4uOZDnd6QZWJushZ41Axf_fcIe8u9ipH84ogoree7vjbU5y18kDquDg";
        // The payload is text, not a claims object: the signature check passes, the claims
        // parse does not. Run the signature part alone, then check the refusal is not a
        // signature failure.
        let key = &set.keys[0];
        assert_eq!(key.kid.as_deref(), Some("bilbo.baggins@hobbiton.example"));
        let (msg, sig) = token.rsplit_once('.').unwrap();
        assert!(
            jsonwebtoken::crypto::verify(sig, msg.as_bytes(), &key.key, Algorithm::RS256).unwrap()
        );
        let r = ClaimRules {
            issuers: vec![],
            audiences: vec![],
            leeway: 0,
            required: vec![],
            typ: None,
        };
        assert_eq!(
            verify(token, &set, &r, NOW).unwrap_err(),
            AuthFail::Malformed
        );
        let tampered = format!("{}A{}", &token[..40], &token[41..]);
        assert_ne!(verify(&tampered, &set, &r, NOW).err(), None);
    }

    #[test]
    fn every_algorithm_verifies_with_its_key() {
        let cases: [(Algorithm, &str, &str); 8] = [
            (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
            (Algorithm::RS384, "rsa_private.pem", "rsa_public.pem"),
            (Algorithm::RS512, "rsa_private.pem", "rsa_public.pem"),
            (Algorithm::PS256, "rsa_private.pem", "rsa_public.pem"),
            (Algorithm::PS384, "rsa_private.pem", "rsa_public.pem"),
            (Algorithm::PS512, "rsa_private.pem", "rsa_public.pem"),
            (Algorithm::ES256, "ec256_private.pem", "ec256_public.pem"),
            (Algorithm::ES384, "ec384_private.pem", "ec384_public.pem"),
        ];
        for (alg, private, public) in cases {
            let enc = if alg == Algorithm::ES256 || alg == Algorithm::ES384 {
                EncodingKey::from_ec_pem(&data(private)).unwrap()
            } else {
                EncodingKey::from_rsa_pem(&data(private)).unwrap()
            };
            let token = encode(&Header::new(alg), &claims(), &enc).unwrap();
            let cfg = JwtConfig {
                secret: None,
                public_key_file: Some(format!(
                    "{}/tests/data/auth/{public}",
                    env!("CARGO_MANIFEST_DIR")
                )),
                algorithm: Some(format!("{alg:?}")),
                ..test_config()
            };
            let set = load_static(&cfg).unwrap();
            let c =
                verify(&token, &set, &rules(), NOW).unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
            assert_eq!(c.map["sub"], "alice");
        }
        let enc = EncodingKey::from_ed_pem(&data("ed25519_private.pem")).unwrap();
        let token = encode(&Header::new(Algorithm::EdDSA), &claims(), &enc).unwrap();
        let cfg = JwtConfig {
            secret: None,
            public_key_file: Some(format!(
                "{}/tests/data/auth/ed25519_public.pem",
                env!("CARGO_MANIFEST_DIR")
            )),
            algorithm: Some("EdDSA".into()),
            ..test_config()
        };
        verify(&token, &load_static(&cfg).unwrap(), &rules(), NOW).unwrap();
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let secret = [7u8; 64];
            let token = encode(
                &Header::new(alg),
                &claims(),
                &EncodingKey::from_secret(&secret),
            )
            .unwrap();
            let cfg = JwtConfig {
                secret: None,
                secret_base64: Some(super::super::config::Secret(b64(&secret))),
                algorithm: Some(format!("{alg:?}")),
                ..test_config()
            };
            verify(&token, &load_static(&cfg).unwrap(), &rules(), NOW).unwrap();
        }
    }

    pub(crate) fn test_config() -> JwtConfig {
        toml::from_str::<JwtConfig>("secret = \"0123456789abcdef0123456789abcdef\"").unwrap()
    }

    /// Every algorithm has a stand-in key that really checks a signature of that algorithm:
    /// a token signed with the stand-in's private half (`tests/data/auth/stand_in_*`)
    /// verifies, one signed with another key does not. A stand-in that failed to parse, or a
    /// key of another family, would refuse at once without the signature check whose cost it
    /// is there to pay.
    #[test]
    fn stand_ins_verify_their_own_signatures() {
        use Algorithm as A;
        let rsa = EncodingKey::from_rsa_pem(&data("stand_in_rsa_private.pem")).unwrap();
        let other_rsa = EncodingKey::from_rsa_pem(&data("rsa_private.pem")).unwrap();
        let ec256 = EncodingKey::from_ec_pem(&data("stand_in_ec256_private.pem")).unwrap();
        let other_ec256 = EncodingKey::from_ec_pem(&data("ec256_private.pem")).unwrap();
        let ec384 = EncodingKey::from_ec_pem(&data("stand_in_ec384_private.pem")).unwrap();
        let other_ec384 = EncodingKey::from_ec_pem(&data("ec384_private.pem")).unwrap();
        let ed = EncodingKey::from_ed_pem(&data("stand_in_ed25519_private.pem")).unwrap();
        let other_ed = EncodingKey::from_ed_pem(&data("ed25519_private.pem")).unwrap();
        let hs = EncodingKey::from_secret(&STAND_IN_SECRET);
        let other_hs = EncodingKey::from_secret(&[1u8; 64]);
        let cases = [
            (A::HS256, &hs, &other_hs),
            (A::HS384, &hs, &other_hs),
            (A::HS512, &hs, &other_hs),
            (A::RS256, &rsa, &other_rsa),
            (A::RS384, &rsa, &other_rsa),
            (A::RS512, &rsa, &other_rsa),
            (A::PS256, &rsa, &other_rsa),
            (A::PS384, &rsa, &other_rsa),
            (A::PS512, &rsa, &other_rsa),
            (A::ES256, &ec256, &other_ec256),
            (A::ES384, &ec384, &other_ec384),
            (A::EdDSA, &ed, &other_ed),
        ];
        for (alg, own, other) in cases {
            let signed = encode(&Header::new(alg), &claims(), own).unwrap();
            assert!(check_stand_in(&signed, alg, &KeySet::default()), "{alg:?}");
            let forged = encode(&Header::new(alg), &claims(), other).unwrap();
            assert!(
                !check_stand_in(&forged, alg, &KeySet::default()),
                "{alg:?}, another key"
            );
        }
    }

    /// RFC 7515 §4.1.4: a token no configured key looked at (a kid that names no key, an
    /// algorithm its key does not allow) is still checked once, against the stand-in of its
    /// algorithm, so that it is not refused faster than a wrong signature (which would tell
    /// which kids exist); the answer is the same as before. A known kid with a wrong
    /// signature needs no stand-in. Before, an unknown kid was refused with no check at all.
    #[test]
    fn a_token_no_key_looked_at_is_checked_against_a_stand_in() {
        let checks = || STAND_IN_CHECKS.with(|c| c.get());
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("a".into());
        let set = KeySet::new(vec![JwtKey::new(
            Some("a".into()),
            &[Algorithm::HS256],
            DecodingKey::from_secret(SECRET),
        )]);
        let sign =
            |h: &Header, key: &[u8]| encode(h, &claims(), &EncodingKey::from_secret(key)).unwrap();
        let before = checks();
        assert!(verify(&sign(&h, SECRET), &set, &rules(), NOW).is_ok());
        let wrong = sign(&h, b"another-secret-another-secret-!!");
        assert_eq!(
            verify(&wrong, &set, &rules(), NOW).err(),
            Some(AuthFail::BadSignature)
        );
        assert_eq!(checks(), before, "a configured key checked the signature");
        h.kid = Some("nope".into());
        assert_eq!(
            verify(&sign(&h, SECRET), &set, &rules(), NOW).err(),
            Some(AuthFail::UnknownKey)
        );
        assert_eq!(checks(), before + 1, "unknown kid");
        let mut h512 = Header::new(Algorithm::HS512);
        h512.kid = Some("a".into());
        assert_eq!(
            verify(&sign(&h512, &[3u8; 64]), &set, &rules(), NOW).err(),
            Some(AuthFail::AlgorithmNotAllowed)
        );
        assert_eq!(checks(), before + 2, "an algorithm the key does not allow");
    }

    /// A token no key looked at pays for the signature check the set's own RSA keys would
    /// make: the RSA stand-in is the set's largest RSA key (a 4096-bit key beside 2048-bit
    /// ones gives a 512-byte modulus, not the fixed stand-in's 256), so that an unknown kid is
    /// not answered faster (or, for a signature of the big key's length, slower) than a known
    /// one with a wrong signature. Before, every set used the fixed 2048-bit stand-in.
    #[test]
    fn the_rsa_stand_in_is_the_sets_largest_rsa_key() {
        let jwk = |name: &str| -> Value { serde_json::from_slice(&data(name)).unwrap() };
        // A 4096-bit modulus: only its length matters here (no token is signed with it).
        let mut n = vec![0xc3u8; 512];
        n[511] |= 1;
        let big = json!({"kty": "RSA", "kid": "big", "use": "sig", "alg": "RS256",
            "n": b64(&n), "e": "AQAB"});
        let ec = json!({"kty": "EC", "kid": "ec", "crv": "P-256", "alg": "ES256",
            "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
            "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"});
        let text = json!({"keys": [jwk("rsa_jwk.json"), ec, big, jwk("rsa2_jwk.json")]});
        let (set, _) = parse_jwks(text.to_string().as_bytes(), &[], JwksOrigin::File).unwrap();
        assert_eq!(set.keys.len(), 4);
        let stand_in = set.rsa_stand_in.as_ref().expect("an RSA stand-in");
        assert_eq!(stand_in.modulus_len(), 512, "the largest RSA key's modulus");
        assert_eq!(stand_in.kid, None);
        assert!(RSA_ALGS
            .iter()
            .all(|a| stand_in.algorithms().any(|b| b == *a)));
        // Only 2048-bit keys: 256 bytes; no RSA key: the fixed stand-ins serve.
        let text = json!({"keys": [jwk("rsa_jwk.json"), jwk("rsa2_jwk.json")]});
        let (set, _) = parse_jwks(text.to_string().as_bytes(), &[], JwksOrigin::File).unwrap();
        assert_eq!(
            set.rsa_stand_in.as_ref().map(JwtKey::modulus_len),
            Some(256)
        );
        assert!(hs_set().rsa_stand_in.is_none());
        // A PEM key (alone in its set) is its own set's stand-in.
        let pem = KeySet::new(vec![JwtKey::new(
            Some("k".into()),
            &[Algorithm::PS256],
            DecodingKey::from_rsa_pem(&data("rsa_public.pem")).unwrap(),
        )]);
        assert!(pem.rsa_stand_in.is_some());
    }

    /// The set's RSA stand-in really checks signatures with the set's key: a token its key
    /// signed, under a kid the set does not have, is refused as an unknown key (the stand-in's
    /// verdict is ignored) after a check that the stand-in passes; one signed with another
    /// key fails that check. The fixed 2048-bit stand-in passed neither.
    #[test]
    fn an_unknown_kid_is_checked_against_the_sets_own_rsa_key() {
        let text =
            json!({"keys": [serde_json::from_slice::<Value>(&data("rsa2_jwk.json")).unwrap()]});
        let (set, _) = parse_jwks(text.to_string().as_bytes(), &[], JwksOrigin::File).unwrap();
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("nope".into());
        let own = EncodingKey::from_rsa_pem(&data("rsa2_private.pem")).unwrap();
        let other = EncodingKey::from_rsa_pem(&data("rsa_private.pem")).unwrap();
        let signed = encode(&h, &claims(), &own).unwrap();
        let before = STAND_IN_CHECKS.with(|c| c.get());
        assert_eq!(
            verify(&signed, &set, &rules(), NOW).err(),
            Some(AuthFail::UnknownKey)
        );
        assert_eq!(STAND_IN_CHECKS.with(|c| c.get()), before + 1);
        assert!(check_stand_in(&signed, Algorithm::RS256, &set));
        let forged = encode(&h, &claims(), &other).unwrap();
        assert!(!check_stand_in(&forged, Algorithm::RS256, &set));
    }

    /// Tokens an attacker would try, each refused for its own reason.
    #[test]
    fn attack_table() {
        let set = hs_set();
        let good = hs_token(&claims());
        assert!(verify(&good, &set, &rules(), NOW).is_ok());
        let (h, rest) = good.split_once('.').unwrap();
        let (p, _sig) = rest.split_once('.').unwrap();
        let _ = h;
        let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let rsa_pub = data("rsa_public.pem");
        let rs_set = KeySet::new(vec![JwtKey::new(
            None,
            &[Algorithm::RS256],
            DecodingKey::from_rsa_pem(&rsa_pub).unwrap(),
        )]);
        // HS256 signed with the RSA public key PEM as the HMAC secret.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(&rsa_pub),
        )
        .unwrap();
        // A token carrying its own key (jwk) and key URL (jku), signed with the attacker's secret.
        let mut injected = Header::new(Algorithm::HS256);
        injected.jku = Some("http://evil.test/jwks".into());
        injected.jwk = serde_json::from_value(
            json!({"kty": "oct", "k": b64(b"attacker-secret-attacker-secret!")}),
        )
        .ok();
        let injected = encode(
            &injected,
            &claims(),
            &EncodingKey::from_secret(b"attacker-secret-attacker-secret!"),
        )
        .unwrap();
        let mut kid = Header::new(Algorithm::HS256);
        kid.kid = Some("../../dev/null".into());
        let kid = encode(&kid, &claims(), &EncodingKey::from_secret(SECRET)).unwrap();
        let kid_set = KeySet::new(vec![JwtKey::new(
            Some("k1".into()),
            &[Algorithm::HS256],
            DecodingKey::from_secret(SECRET),
        )]);
        let mut c = claims();
        c["exp"] = json!(NOW - 31);
        let expired = hs_token(&c);
        let mut c = claims();
        c["nbf"] = json!(NOW + 31);
        let early = hs_token(&c);
        let mut c = claims();
        c["iss"] = json!("https://evil.test");
        let wrong_iss = hs_token(&c);
        let mut c = claims();
        c["aud"] = json!(["other"]);
        let wrong_aud = hs_token(&c);
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        let no_sub = hs_token(&c);
        let mut c = claims();
        c["sub"] = Value::Null;
        let null_sub = hs_token(&c);
        let wrong_key = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"another-secret-another-secret-!!"),
        )
        .unwrap();
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &claims(),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let crit = {
            let h = b64(br#"{"alg":"HS256","crit":["exp-ext"],"exp-ext":1}"#);
            let msg = format!("{h}.{p}");
            let sig = ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET),
                msg.as_bytes(),
            );
            format!("{msg}.{}", b64(sig.as_ref()))
        };
        let table: Vec<(&str, String, &KeySet, AuthFail)> = vec![
            (
                "alg none, no signature",
                format!("{none_header}.{p}."),
                &set,
                AuthFail::Malformed,
            ),
            (
                "alg none with the good signature",
                format!("{none_header}.{p}.{}", good.rsplit('.').next().unwrap()),
                &set,
                AuthFail::Malformed,
            ),
            (
                "stripped signature",
                format!("{h}.{p}."),
                &set,
                AuthFail::BadSignature,
            ),
            (
                "no signature part",
                format!("{h}.{p}"),
                &set,
                AuthFail::Malformed,
            ),
            ("bad signature", wrong_key, &set, AuthFail::BadSignature),
            (
                "HS256 with the RSA public key as secret",
                confused,
                &rs_set,
                AuthFail::AlgorithmNotAllowed,
            ),
            (
                "HS512 against an HS256 key",
                hs512,
                &set,
                AuthFail::AlgorithmNotAllowed,
            ),
            (
                "embedded jwk and jku",
                injected,
                &set,
                AuthFail::BadSignature,
            ),
            ("unknown kid", kid, &kid_set, AuthFail::UnknownKey),
            ("expired beyond leeway", expired, &set, AuthFail::Expired),
            ("nbf beyond leeway", early, &set, AuthFail::NotYetValid),
            ("wrong issuer", wrong_iss, &set, AuthFail::WrongIssuer),
            ("wrong audience", wrong_aud, &set, AuthFail::WrongAudience),
            (
                "required claim missing",
                no_sub,
                &set,
                AuthFail::MissingClaim,
            ),
            (
                "required claim null",
                null_sub,
                &set,
                AuthFail::MissingClaim,
            ),
            ("garbage", "not-a-token".into(), &set, AuthFail::Malformed),
            ("unknown crit extension", crit, &set, AuthFail::Malformed),
            (
                "header not JSON",
                format!("{}.{p}.x", b64(b"{")),
                &set,
                AuthFail::Malformed,
            ),
        ];
        for (what, token, keys, want) in table {
            assert_eq!(
                verify(&token, keys, &rules(), NOW).unwrap_err(),
                want,
                "{what}"
            );
        }
        // Within the leeway both time claims pass.
        let mut c = claims();
        c["exp"] = json!(NOW - 29);
        c["nbf"] = json!(NOW + 29);
        assert!(verify(&hs_token(&c), &set, &rules(), NOW).is_ok());
    }

    #[test]
    fn kid_selects_the_key_and_jwks_algorithms_come_from_the_key() {
        let secret_a = [1u8; 32];
        let secret_b = [2u8; 32];
        let jwks = json!({"keys": [
            {"kty": "oct", "kid": "a", "alg": "HS256", "k": b64(&secret_a)},
            {"kty": "oct", "kid": "b", "alg": "HS256", "k": b64(&secret_b)},
            {"kty": "oct", "kid": "c", "k": b64(&secret_b)},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"}
        ]})
        .to_string();
        let set = parse_jwks(jwks.as_bytes(), &[], JwksOrigin::File)
            .unwrap()
            .0;
        // "c" names no algorithm and is symmetric: unusable. "enc" is for encryption.
        assert_eq!(set.keys.len(), 2);
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("b".into());
        let t = encode(&h, &claims(), &EncodingKey::from_secret(&secret_b)).unwrap();
        assert!(verify(&t, &set, &rules(), NOW).is_ok());
        h.kid = Some("a".into());
        let t = encode(&h, &claims(), &EncodingKey::from_secret(&secret_b)).unwrap();
        assert_eq!(
            verify(&t, &set, &rules(), NOW).unwrap_err(),
            AuthFail::BadSignature
        );
        // No kid: the keys are tried in turn.
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(&secret_b),
        )
        .unwrap();
        assert!(verify(&t, &set, &rules(), NOW).is_ok());
        assert!(parse_jwks(b"{\"keys\": []}", &[], JwksOrigin::File).is_err());
        assert!(parse_jwks(b"[]", &[], JwksOrigin::File).is_err());
    }

    /// RFC 7515 §4.1.4: a kid naming no key of the set is an unknown key even when keys
    /// without a kid were tried and failed (the caller then fetches the set again); a kid
    /// naming a key tries that key alone, however many kid-less keys come first.
    #[test]
    fn a_kid_naming_no_key_is_unknown_whatever_the_kidless_keys_answer() {
        let kidless = |n: u8| {
            JwtKey::new(
                None,
                &[Algorithm::HS256],
                DecodingKey::from_secret(&[n; 32]),
            )
        };
        let mut keys: Vec<JwtKey> = (1..=5).map(kidless).collect();
        keys.push(JwtKey::new(
            Some("b".into()),
            &[Algorithm::HS256],
            DecodingKey::from_secret(SECRET),
        ));
        let set = KeySet::new(keys);
        let with_kid = |kid: &str, key: &[u8]| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(kid.into());
            encode(&h, &claims(), &EncodingKey::from_secret(key)).unwrap()
        };
        assert_eq!(
            verify(
                &with_kid("new", b"another-secret-another-secret-!!"),
                &set,
                &rules(),
                NOW
            )
            .unwrap_err(),
            AuthFail::UnknownKey
        );
        // Only a kid-less key of another algorithm: still unknown, not "algorithm not allowed".
        let rs_only = KeySet::new(vec![JwtKey::new(
            None,
            &[Algorithm::RS256],
            DecodingKey::from_rsa_pem(&data("rsa_public.pem")).unwrap(),
        )]);
        assert_eq!(
            verify(&with_kid("new", SECRET), &rs_only, &rules(), NOW).unwrap_err(),
            AuthFail::UnknownKey
        );
        // A kid-less key still verifies a token whose kid names no key.
        assert!(verify(&with_kid("new", &[2; 32]), &set, &rules(), NOW).is_ok());
        // The named key is reached past five kid-less keys, and alone decides.
        assert!(verify(&with_kid("b", SECRET), &set, &rules(), NOW).is_ok());
        assert_eq!(
            verify(&with_kid("b", &[1; 32]), &set, &rules(), NOW).unwrap_err(),
            AuthFail::BadSignature
        );
    }

    /// RFC 7518 §3.2: a symmetric key shorter than its hash fails a JWKS file; from a URL no
    /// symmetric key is used, each named in the notes, and the others serve.
    #[test]
    fn symmetric_jwks_keys_by_origin() {
        // A real RSA key (2048 bits): a shorter one fails a file on its own (RFC 7518 §3.3).
        let mut rsa: Value = serde_json::from_slice(&data("rsa_jwk.json")).unwrap();
        rsa["kid"] = json!("r");
        let set = |len: usize, alg: &str| {
            json!({"keys": [
                {"kty": "oct", "kid": "s", "alg": alg, "k": b64(&vec![1u8; len])},
                {"kty": "oct", "alg": "HS256", "k": b64(&[2u8; 32])},
                rsa.clone()
            ]})
            .to_string()
        };
        for (alg, need) in [("HS256", 32), ("HS384", 48), ("HS512", 64)] {
            let e = parse_jwks(set(need - 1, alg).as_bytes(), &[], JwksOrigin::File)
                .err()
                .unwrap();
            assert!(
                e.contains("kid \"s\"") && e.contains(&format!("at least {need} bytes")),
                "{e}"
            );
            let (ok, notes) = parse_jwks(set(need, alg).as_bytes(), &[], JwksOrigin::File).unwrap();
            assert_eq!((ok.keys.len(), notes.len()), (3, 0));
        }
        let e = parse_jwks(set(0, "HS256").as_bytes(), &[], JwksOrigin::File)
            .err()
            .unwrap();
        assert!(e.contains("this one has 0"), "{e}");
        let (got, notes) = parse_jwks(set(64, "HS256").as_bytes(), &[], JwksOrigin::Url).unwrap();
        assert_eq!(got.keys.len(), 1);
        assert_eq!(got.keys[0].kid.as_deref(), Some("r"));
        assert_eq!(notes.len(), 2);
        assert!(notes[0].starts_with("key 0 (kid \"s\")"), "{}", notes[0]);
        assert!(notes[1].starts_with("key 1 (no kid)"), "{}", notes[1]);
        // Only symmetric keys: no usable key, and the reason says why.
        let only = json!({"keys": [{"kty": "oct", "alg": "HS256", "k": b64(&[2u8; 32])}]});
        let e = parse_jwks(only.to_string().as_bytes(), &[], JwksOrigin::Url)
            .err()
            .unwrap();
        assert!(e.contains("symmetric"), "{e}");
        // A hostile kid is escaped and cut in the note.
        let long = json!({"keys": [{"kty": "oct", "kid": format!("a\n{}", "x".repeat(500)), "alg": "HS256", "k": ""},
                                   rsa]});
        let (_, notes) = parse_jwks(long.to_string().as_bytes(), &[], JwksOrigin::Url).unwrap();
        assert!(
            notes[0].contains("a\\n") && notes[0].len() < 300,
            "{}",
            notes[0]
        );
    }

    #[test]
    fn keys_not_meant_to_verify_are_skipped() {
        let secret = [3u8; 32];
        let key = |kid: &str, extra: Value| {
            let mut k = json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64(&secret)});
            for (n, v) in extra.as_object().unwrap() {
                k[n] = v.clone();
            }
            k
        };
        let jwks = json!({"keys": [
            key("plain", json!({})),
            key("sig", json!({"use": "sig"})),
            key("verify", json!({"key_ops": ["sign", "verify"]})),
            key("other-use", json!({"use": "wrap"})),
            key("enc", json!({"use": "enc"})),
            key("sign-only", json!({"key_ops": ["sign"]})),
            key("no-ops", json!({"key_ops": []})),
            key("encrypt", json!({"key_ops": ["encrypt", "deriveKey"]})),
        ]})
        .to_string();
        let set = parse_jwks(jwks.as_bytes(), &[], JwksOrigin::File)
            .unwrap()
            .0;
        let kids: Vec<&str> = set.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["plain", "sig", "verify"]);
        // A token naming a skipped key is refused as signed by an unknown key.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("sign-only".into());
        let t = encode(&h, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
        assert_eq!(
            verify(&t, &set, &rules(), NOW).unwrap_err(),
            AuthFail::UnknownKey
        );
        h.kid = Some("verify".into());
        let t = encode(&h, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
        assert!(verify(&t, &set, &rules(), NOW).is_ok());
        // A set of keys none of which verifies is refused whole.
        let none = json!({"keys": [key("x", json!({"key_ops": ["sign"]}))]}).to_string();
        assert!(parse_jwks(none.as_bytes(), &[], JwksOrigin::File).is_err());
    }

    #[test]
    fn config_refusals() {
        let e = |t: &str| {
            load_static(&toml::from_str::<JwtConfig>(t).unwrap())
                .err()
                .map(|(k, r)| format!("{k}: {r}"))
        };
        assert!(e("secret = \"short\"")
            .unwrap()
            .contains("at least 32 bytes"));
        assert!(!e("secret = \"short-secret-value\"")
            .unwrap()
            .contains("short-secret-value"));
        assert!(
            e("public_key_file = \"/nonexistent.pem\"\nalgorithm = \"RS256\"")
                .unwrap()
                .contains("cannot read")
        );
        assert!(e("jwks_file = \"/nonexistent.json\"")
            .unwrap()
            .starts_with("jwks_file"));
        let rsa = format!(
            "{}/tests/data/auth/rsa_public.pem",
            env!("CARGO_MANIFEST_DIR")
        );
        assert!(e(&format!(
            "public_key_file = \"{rsa}\"\nalgorithm = \"ES256\""
        ))
        .unwrap()
        .contains("not a PEM public key"));
        assert!(
            e("secret = \"0123456789abcdef0123456789abcdef\"\nalgorithm = \"RS256\"")
                .unwrap()
                .contains("HS256")
        );
        let both = toml::from_str::<JwtConfig>("secret = \"x\"\njwks_file = \"y\"").unwrap();
        assert!(check_config(&both).is_err());
        let stray = toml::from_str::<JwtConfig>("secret = \"x\"\njwks_grace = \"1m\"").unwrap();
        assert_eq!(check_config(&stray).unwrap_err().0, "jwks_grace");
        let stray =
            toml::from_str::<JwtConfig>("jwks_file = \"x\"\nalgorithm = \"RS256\"").unwrap();
        assert_eq!(check_config(&stray).unwrap_err().0, "algorithm");
        let no_alg = toml::from_str::<JwtConfig>(&format!("public_key_file = \"{rsa}\"")).unwrap();
        assert_eq!(check_config(&no_alg).unwrap_err().0, "algorithm");
    }

    #[test]
    fn claim_values_as_headers() {
        assert_eq!(
            claim_header_value(&json!("alice")).as_deref(),
            Some("alice")
        );
        assert_eq!(claim_header_value(&json!(42)).as_deref(), Some("42"));
        assert_eq!(
            claim_header_value(&json!(["a", "b"])).as_deref(),
            Some("a,b")
        );
        assert_eq!(claim_header_value(&json!("a\r\nx-evil: 1")), None);
        assert_eq!(claim_header_value(&json!({"a": 1})), None);
        let m = json!({"scope": "a  b", "scp": ["c", 1, "d"]});
        let m = m.as_object().unwrap();
        assert_eq!(
            claim_list(m, "scope"),
            vec!["a".into(), "b".into()] as Vec<Box<str>>
        );
        assert_eq!(
            claim_list(m, "scp"),
            vec!["c".into(), "d".into()] as Vec<Box<str>>
        );
    }

    /// RFC 7515 §4.1.9: `typ` is a media type, compared case-insensitively, and one without a
    /// `/` stands for `application/` + it.
    #[test]
    fn typ_compares_as_a_media_type() {
        let want = full_media_type("at+jwt");
        assert_eq!(want, "application/at+jwt");
        for got in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "APPLICATION/at+JWT",
        ] {
            assert!(typ_matches(got, &want), "{got}");
        }
        for got in [
            "",
            "jwt",
            "at+jwt ",
            " at+jwt",
            "text/at+jwt",
            "application/",
            "application/jwt",
            "at+jwt/",
            "application/at+jwtx",
            "é",
            "applicatioé/at+jwt",
        ] {
            assert!(!typ_matches(got, &want), "{got}");
        }
        let want = full_media_type("application/secevent+jwt");
        assert!(typ_matches("secevent+jwt", &want));
        assert!(!typ_matches("at+jwt", &want));
    }
}
