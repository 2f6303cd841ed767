//! Authentication over real sockets: JWT (inline secret, PEM, JWKS file and URL), API keys and
//! consumers, any-of policies, OAuth2 introspection; 401/403 answers and the identity headers
//! the upstream sees.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use ringway::auth::apikey::key_hash_hex;
use ringway::config::DriverChoice;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::{json, Value};
use support::*;

const SECRET: &str = "test-only-secret-of-32-bytes-min";

fn hs(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs(claims: &Value, key_file: &str, kid: &str) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.into());
    let key = EncodingKey::from_rsa_pem(&std::fs::read(data(key_file)).unwrap()).unwrap();
    encode(&h, claims, &key).unwrap()
}

fn alice() -> Value {
    json!({"sub": "alice", "iss": "https://idp.test", "aud": "api", "exp": now() + 600,
           "scope": "read write", "tenant": "t1", "roles": ["staff"]})
}

fn with(mut c: Value, k: &str, v: Value) -> Value {
    c[k] = v;
    c
}

/// A gateway with a JWT provider ("jwt", HS256), API keys, two consumers and routes:
/// /jwt (jwt), /admin (jwt + scope admin), /staff (jwt + role staff), /key (api_key),
/// /either (jwt or api_key), /open (none).
fn gateway_config(up: SocketAddr) -> String {
    config(
        &[up],
        &format!(
            r#"
[auth.api_key]
query = "api_key"

[auth.jwt.jwt]
secret = "{SECRET}"
issuers = ["https://idp.test"]
audiences = ["api"]
forward_claims = {{ sub = "x-user-id", tenant = "x-tenant" }}

[[consumers]]
name = "alice-app"
jwt_subjects = ["alice"]

[[consumers]]
name = "batch"
metadata = {{ team = "data" }}
api_keys = ["{}"]
scopes = ["read"]

[[routes]]
path_prefix = "/jwt"
upstream = "up"
auth = "jwt"

[[routes]]
path_prefix = "/admin"
upstream = "up"
auth = {{ any_of = ["jwt"], scopes_all = ["admin"] }}

[[routes]]
path_prefix = "/staff"
upstream = "up"
auth = {{ any_of = ["jwt"], roles_any = ["staff", "ops"], hide_credentials = false }}

[[routes]]
path_prefix = "/key"
upstream = "up"
auth = "api_key"

[[routes]]
path_prefix = "/either"
upstream = "up"
auth = {{ any_of = ["jwt", "api_key"], scopes_any = ["read"] }}

[[routes]]
path_prefix = "/open"
upstream = "up"
"#,
            key_hash_hex(b"batch-key-1")
        ),
    )
}

fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Resp {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n{headers}\r\n").as_bytes(),
    )
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}\r\n")
}

#[test]
fn valid_jwt_reaches_upstream_with_claims_and_without_credentials() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&gateway_config(up.addr), d);
        let token = hs(&alice());
        // Spoofed identity headers from the client are dropped.
        let spoof = "X-User-Id: mallory\r\nX-Consumer: admin\r\nX-Tenant: t9\r\n";
        let mut c = Client::connect(gw.addr);
        for i in 0..3 {
            c.send(
                format!(
                    "GET /jwt/x HTTP/1.1\r\nHost: a\r\n{}{spoof}\r\n",
                    bearer(&token)
                )
                .as_bytes(),
            );
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{d:?} request {i}: {}", r.text());
            let seen = up.last();
            assert_eq!(seen.headers_named("x-user-id"), vec!["alice"]);
            assert_eq!(seen.headers_named("x-tenant"), vec!["t1"]);
            assert_eq!(seen.headers_named("x-consumer"), vec!["alice-app"]);
            assert_eq!(seen.header("authorization"), None);
        }
        // hide_credentials = false keeps the Authorization header.
        let r = get_with(gw.addr, "/staff", &bearer(&token));
        assert_eq!(r.status, 200);
        assert_eq!(
            up.last().header("authorization"),
            Some(&*format!("Bearer {token}"))
        );
        // Routes without auth still drop spoofed identity headers.
        let r = get_with(gw.addr, "/open", spoof);
        assert_eq!(r.status, 200);
        assert_eq!(up.last().header("x-user-id"), None);
        assert_eq!(up.last().header("x-consumer"), None);
    }
}

#[test]
fn bad_tokens_are_401_with_a_challenge_and_never_reach_the_upstream() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&gateway_config(up.addr), DriverChoice::Auto);
    let good = hs(&alice());
    let (h, rest) = good.split_once('.').unwrap();
    let p = rest.split_once('.').unwrap().0;
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let rsa_pub = std::fs::read(data("rsa_public.pem")).unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("expired", hs(&with(alice(), "exp", json!(now() - 3600)))),
        (
            "not yet valid",
            hs(&with(alice(), "nbf", json!(now() + 3600))),
        ),
        (
            "wrong issuer",
            hs(&with(alice(), "iss", json!("https://evil.test"))),
        ),
        ("wrong audience", hs(&with(alice(), "aud", json!("other")))),
        (
            "alg none",
            format!("{}.{p}.", b64(r#"{"alg":"none","typ":"JWT"}"#)),
        ),
        ("stripped signature", format!("{h}.{p}.")),
        (
            "bad signature",
            encode(
                &Header::new(Algorithm::HS256),
                &alice(),
                &EncodingKey::from_secret(b"another-secret-of-32-bytes-long!"),
            )
            .unwrap(),
        ),
        (
            "signed with the RSA public key as HMAC secret",
            encode(
                &Header::new(Algorithm::HS256),
                &alice(),
                &EncodingKey::from_secret(&rsa_pub),
            )
            .unwrap(),
        ),
        (
            "RS256 token for an HS256 key",
            rs(&alice(), "rsa_private.pem", "rsa"),
        ),
        ("garbage", "abc.def".into()),
    ];
    for (what, token) in &cases {
        let r = get_with(gw.addr, "/jwt", &bearer(token));
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"ringway\", error=\"invalid_token\""),
            "{what}"
        );
        let j = r.json();
        assert_eq!(j["error"], "invalid_token", "{what}");
        assert!(j["request_id"].is_string());
        assert!(
            !r.text().contains(token.as_str()),
            "{what}: the token is echoed"
        );
    }
    // No credentials: a bare challenge (RFC 6750 §3.1).
    let r = get_with(gw.addr, "/jwt", "");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"ringway\"")
    );
    assert_eq!(r.json()["error"], "unauthorized");
    // Two Authorization headers, the first one good: refused.
    let two = format!("{}Authorization: Bearer x.y.z\r\n", bearer(&good));
    assert_eq!(get_with(gw.addr, "/jwt", &two).status, 401);
    // Another scheme is no credential for a bearer route.
    let r = get_with(gw.addr, "/jwt", "Authorization: Basic YTpi\r\n");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"ringway\"")
    );
    assert_eq!(up.hits(), 0);
    // The connection stays usable after a 401.
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /jwt HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 401);
    c.send(format!("GET /jwt HTTP/1.1\r\nHost: a\r\n{}\r\n", bearer(&good)).as_bytes());
    assert_eq!(c.read_response().unwrap().status, 200);
}

/// `required_claims`: a claim whose value is JSON null counts as absent (RFC 7519 §4: null
/// asserts nothing), so a token with `"sub": null` is refused like one without `sub`.
#[test]
fn a_required_claim_that_is_null_is_missing_rfc7519_4() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let toml = config(
            &[up.addr],
            &format!(
                "[auth.jwt.jwt]\nsecret = \"{SECRET}\"\nrequired_claims = [\"exp\", \"sub\"]\nforward_claims = {{ sub = \"x-user-id\" }}\n\n[[routes]]\nupstream = \"up\"\nauth = \"jwt\"\n"
            ),
        );
        let gw = TestGateway::start(&toml, d);
        let exp = now() + 600;
        for (what, claims) in [
            ("sub null", json!({"sub": null, "exp": exp})),
            ("sub missing", json!({"exp": exp})),
        ] {
            let r = get_with(gw.addr, "/r", &bearer(&hs(&claims)));
            assert_eq!(r.status, 401, "{d:?} {what}: {}", r.text());
            assert_eq!(r.json()["error"], "invalid_token", "{d:?} {what}");
            assert!(
                r.text().contains("lacks a required claim"),
                "{d:?} {what}: {}",
                r.text()
            );
        }
        assert_eq!(up.hits(), 0, "{d:?}");
        let r = get_with(
            gw.addr,
            "/r",
            &bearer(&hs(&json!({"sub": "bob", "exp": exp}))),
        );
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_eq!(up.last().header("x-user-id"), Some("bob"));
    }
}

#[test]
fn missing_scope_or_role_is_403_insufficient_scope() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&gateway_config(up.addr), DriverChoice::Auto);
    let r = get_with(gw.addr, "/admin", &bearer(&hs(&alice())));
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"ringway\", error=\"insufficient_scope\", scope=\"admin\"")
    );
    assert_eq!(r.json()["error"], "insufficient_scope");
    let admin = with(alice(), "scope", json!("read admin"));
    assert_eq!(
        get_with(gw.addr, "/admin", &bearer(&hs(&admin))).status,
        200
    );
    // `scp` arrays count as scopes too.
    let scp = with(with(alice(), "scope", Value::Null), "scp", json!(["admin"]));
    let mut scp = scp;
    scp.as_object_mut().unwrap().remove("scope");
    assert_eq!(get_with(gw.addr, "/admin", &bearer(&hs(&scp))).status, 200);
    let no_role = with(alice(), "roles", json!(["guest"]));
    assert_eq!(
        get_with(gw.addr, "/staff", &bearer(&hs(&no_role))).status,
        403
    );
    assert_eq!(
        get_with(gw.addr, "/staff", &bearer(&hs(&alice()))).status,
        200
    );
}

#[test]
fn api_keys_map_to_consumers() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&gateway_config(up.addr), d);
        let r = get_with(
            gw.addr,
            "/key",
            "X-Api-Key: batch-key-1\r\nX-Consumer: root\r\n",
        );
        assert_eq!(r.status, 200, "{d:?}");
        let seen = up.last();
        assert_eq!(seen.headers_named("x-consumer"), vec!["batch"]);
        assert_eq!(
            seen.header("x-api-key"),
            None,
            "the key is hidden from the upstream"
        );
        // From the query parameter, which `hide_credentials` (the default) removes from the
        // target the upstream sees, however its name is spelled, other parameters kept.
        for (q, target) in [
            ("api_key=batch-key-1", "/key"),
            ("a=1&api_key=batch-key-1&b=2", "/key?a=1&b=2"),
            ("api%5Fkey=batch-key-1&x", "/key?x"),
            ("api_keys=1&api_key=batch-key-1", "/key?api_keys=1"),
        ] {
            let r = get_with(gw.addr, &format!("/key?{q}"), "");
            assert_eq!(r.status, 200, "{q} {d:?}");
            assert_eq!(up.last().target, target, "{q} {d:?}");
        }
        // Read percent-decoded, as the upstream reads it (RFC 3986 §2.1), and only when it
        // is there once: with two, which one the upstream takes is its own choice.
        for (q, want) in [
            ("api_key=batch%2Dkey%2D1", 200),
            ("api%5Fkey=batch-key-1", 200),
            ("api_key=batch-key-1&api_key=bad", 401),
            ("api_key=bad&api_key=batch-key-1", 401),
            ("api_key=batch-key-1&api%5fkey=batch-key-1", 401),
        ] {
            let r = get_with(gw.addr, &format!("/key?{q}"), "");
            assert_eq!(r.status, want, "{q} {d:?}");
        }
        let r = get_with(gw.addr, "/key", "X-Api-Key: batch-key-2\r\n");
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"], "invalid_token");
        assert!(!r.text().contains("batch-key-2"));
        // The stored hash is not a key.
        let r = get_with(
            gw.addr,
            "/key",
            &format!("X-Api-Key: {}\r\n", key_hash_hex(b"batch-key-1")),
        );
        assert_eq!(r.status, 401);
        let r = get_with(gw.addr, "/key", "");
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"ringway\"")
        );
        assert_eq!(up.hits(), 7);
    }
}

/// A query is read as `application/x-www-form-urlencoded` (each `+` a space, then `%XX`
/// decoded; WHATWG URL §5.1), as upstream frameworks read it: an API key in the query is that
/// key. Before, `+` stayed `+`, so `?api_key=two+words` failed a key the upstream would read as
/// `two words`, and `a+b/c=` passed as a key the upstream reads as `a b/c=`. A `+` in a key
/// goes as `%2B`, as every form encoder writes it. `hide_credentials` drops the parameter read
/// the same way.
#[test]
fn an_api_key_in_the_query_is_read_form_decoded() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(
            &config(
                &[up.addr],
                &format!(
                    "[auth.api_key]\nquery = \"api_key\"\n\
                     [[consumers]]\nname = \"spaced\"\napi_keys = [\"{}\"]\n\
                     [[consumers]]\nname = \"b64\"\napi_keys = [\"{}\"]\n\
                     [[routes]]\nupstream = \"up\"\nauth = \"api_key\"\n",
                    key_hash_hex(b"two words"),
                    key_hash_hex(b"a+b/c=")
                ),
            ),
            d,
        );
        for (q, want, consumer) in [
            ("api_key=two+words", 200, Some("spaced")),
            ("api_key=two%20words", 200, Some("spaced")),
            ("api_key=a%2Bb%2Fc%3D", 200, Some("b64")),
            ("api_key=a%2Bb/c=", 200, Some("b64")),
            ("api_key=a+b/c=", 401, None),
            ("api_key=two+words&api+key=x", 200, Some("spaced")),
        ] {
            let r = get_with(gw.addr, &format!("/k?{q}"), "");
            assert_eq!(r.status, want, "{d:?} {q}");
            if let Some(c) = consumer {
                assert_eq!(up.last().header("x-consumer"), Some(c), "{d:?} {q}");
            }
        }
        let r = get_with(gw.addr, "/k?x=1&api_key=two+words&y", "");
        assert_eq!(r.status, 200, "{d:?}");
        assert_eq!(up.last().target, "/k?x=1&y", "{d:?}: the key is hidden");
    }
}

#[test]
fn any_of_accepts_either_credential() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&gateway_config(up.addr), DriverChoice::Auto);
    assert_eq!(
        get_with(gw.addr, "/either", &bearer(&hs(&alice()))).status,
        200
    );
    assert_eq!(up.last().header("x-user-id"), Some("alice"));
    assert_eq!(
        get_with(gw.addr, "/either", "X-Api-Key: batch-key-1\r\n").status,
        200
    );
    assert_eq!(up.last().header("x-consumer"), Some("batch"));
    // A bad token and a good key: the key wins.
    let both = format!("{}X-Api-Key: batch-key-1\r\n", bearer("x.y.z"));
    assert_eq!(get_with(gw.addr, "/either", &both).status, 200);
    // Both bad: the first failure is reported.
    let both = format!("{}X-Api-Key: nope\r\n", bearer("x.y.z"));
    let r = get_with(gw.addr, "/either", &both);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "the token is malformed");
    assert_eq!(get_with(gw.addr, "/either", "").status, 401);
    // scopes_any = ["read"]: a token without it is refused, the key's consumer has it.
    let none = with(alice(), "scope", json!("write"));
    assert_eq!(
        get_with(gw.addr, "/either", &bearer(&hs(&none))).status,
        403
    );
}

#[test]
fn pem_and_jwks_file_keys() {
    let up = Upstream::echo();
    let jwks = format!(
        "{{\"keys\": [{}, {}]}}",
        std::fs::read_to_string(data("rsa_jwk.json")).unwrap(),
        std::fs::read_to_string(data("rsa2_jwk.json")).unwrap()
    );
    let dir = std::env::temp_dir().join(format!("ringway-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks).unwrap();
    let cfg = config(
        &[up.addr],
        &format!(
            r#"
[auth.jwt.pem]
public_key_file = "{}"
algorithm = "RS256"

[auth.jwt.set]
jwks_file = "{}"

[[routes]]
path = "/pem"
upstream = "up"
auth = "pem"

[[routes]]
path = "/set"
upstream = "up"
auth = "set"
"#,
            data("rsa_public.pem"),
            jwks_path.display()
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let c = alice();
    assert_eq!(
        get_with(gw.addr, "/pem", &bearer(&rs(&c, "rsa_private.pem", "rsa"))).status,
        200
    );
    assert_eq!(
        get_with(gw.addr, "/pem", &bearer(&rs(&c, "rsa2_private.pem", "rsa"))).status,
        401
    );
    assert_eq!(
        get_with(gw.addr, "/set", &bearer(&rs(&c, "rsa_private.pem", "rsa"))).status,
        200
    );
    assert_eq!(
        get_with(
            gw.addr,
            "/set",
            &bearer(&rs(&c, "rsa2_private.pem", "rsa2"))
        )
        .status,
        200
    );
    // kid says rsa2, signed by rsa: the named key does not verify it.
    assert_eq!(
        get_with(gw.addr, "/set", &bearer(&rs(&c, "rsa_private.pem", "rsa2"))).status,
        401
    );
    assert_eq!(
        get_with(
            gw.addr,
            "/set",
            &bearer(&rs(&c, "rsa_private.pem", "other"))
        )
        .status,
        401
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// RFC 8725 §3.8, §3.9: a JWT provider that checks neither `iss` nor `aud` accepts tokens of
/// any issuer or audience signed with a key it trusts. `ringway check` says so in a warning
/// (on stderr, naming the provider) and still passes the config; a provider with either
/// check gets none.
#[test]
fn check_warns_of_a_jwt_provider_without_issuer_or_audience_rfc8725_3_8() {
    let toml = config(
        &["127.0.0.1:9".parse().unwrap()],
        &format!(
            "[auth.jwt.open]\nsecret = \"{SECRET}\"\n\n[auth.jwt.by_iss]\nsecret = \"{SECRET}\"\nissuers = [\"https://idp.test\"]\n\n[auth.jwt.by_aud]\nsecret = \"{SECRET}\"\naudiences = [\"api\"]\n\n[[routes]]\nupstream = \"up\"\nauth = \"open\"\n"
        ),
    );
    let cfg = ringway::config::Config::parse(&toml, "auth.toml").expect("a valid config");
    let w = cfg.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("auth.jwt.open: "), "{w:?}");

    let dir = std::env::temp_dir().join(format!("ringway-check-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("auth.toml");
    std::fs::write(&file, &toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(["check", "-c"])
        .arg(&file)
        .env("RINGWAY_LOG", "off")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "a warning is not an error: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(": OK"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].starts_with(
            "ringway: warning: auth.jwt.open: checks neither the issuer nor the audience"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET), "{stderr}");
}

#[test]
fn config_errors_name_the_key() {
    let bad = |extra: &str| {
        ringway::config::Config::parse(
            &config(&["127.0.0.1:9".parse().unwrap()], extra),
            "auth.toml",
        )
        .unwrap_err()
    };
    let e =
        bad("[auth.jwt.a]\npublic_key_file = \"/nonexistent/key.pem\"\nalgorithm = \"RS256\"\n");
    assert_eq!(e.key, "auth.jwt.a.public_key_file");
    assert!(e.reason.contains("cannot read"), "{e}");
    assert!(e.line.is_some(), "{e}");
    let e = bad("[auth.jwt.a]\nsecret = \"too-short-secret\"\n");
    assert_eq!(e.key, "auth.jwt.a.secret");
    assert!(
        !e.to_string().contains("too-short-secret"),
        "the secret is in the error: {e}"
    );
    let e = bad("[[consumers]]\nname = \"c\"\napi_keys = [\"plain-key\"]\n");
    assert_eq!(e.key, "consumers[0].api_keys[0]");
    assert!(!e.to_string().contains("plain-key"), "{e}");
    let e = bad("[[consumers]]\nname = \"c\"\napi_keys = [\"sha256:abc\"]\n");
    assert!(e.reason.contains("64 hex digits"), "{e}");
    let e = bad("[[routes]]\nupstream = \"up\"\nauth = \"jwt\"\n");
    assert_eq!(e.key, "routes[0].auth");
    let e =
        bad("[[routes]]\nupstream = \"up\"\nauth = { any_of = [\"api_key\"], scope = [\"x\"] }\n");
    assert!(e.reason.contains("unknown field `scope`"), "{e}");
    let bad_jwks = std::env::temp_dir().join(format!("ringway-bad-jwks-{}", std::process::id()));
    std::fs::write(&bad_jwks, "{\"keys\": 1}").unwrap();
    let e = bad(&format!(
        "[auth.jwt.a]\njwks_file = \"{}\"\n",
        bad_jwks.display()
    ));
    assert_eq!(e.key, "auth.jwt.a.jwks_file");
    assert!(e.reason.contains("not a JWK Set"), "{e}");
    let _ = std::fs::remove_file(&bad_jwks);
}

// ---------------------------------------------------------------------------------------------
// Loopback servers: a JWKS key server and an introspection endpoint.

/// The certificate a TLS loopback server presents, swappable while it runs: the config and
/// the file stem it was made from.
type CertSlot = Arc<Mutex<(Arc<ServerConfig>, &'static str)>>;

fn cert_slot(stem: &'static str) -> CertSlot {
    Arc::new(Mutex::new((pki::server_config(stem), stem)))
}

/// A byte stream the loopback server talks over: TCP, or TLS over TCP.
trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

/// A tiny HTTP server answering every request with `answer(request bytes)`, one connection at a
/// time, counting connections and requests. Over TLS when given a certificate; `split` sends
/// each answer's head and body apart (a pause between), so the client reads it in pieces.
/// Stops when dropped.
struct Loopback {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    /// Per request read: the certificate its connection presented ("plain" without TLS).
    served: Arc<Mutex<Vec<&'static str>>>,
    stop: Arc<AtomicBool>,
}

impl Loopback {
    fn start(answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static) -> Loopback {
        Loopback::serve(None, false, answer)
    }

    fn start_tls(
        cert: CertSlot,
        split: bool,
        answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> Loopback {
        Loopback::serve(Some(cert), split, answer)
    }

    fn serve(
        cert: Option<CertSlot>,
        split: bool,
        answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> Loopback {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, sv, st) = (conns.clone(), served.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !st.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let Ok((tcp, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                // Counted before the certificate is picked: a connection counted after a swap
                // presents the new certificate.
                c.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.set_nonblocking(false);
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let (mut s, label): (Box<dyn Io>, &'static str) = match &cert {
                    None => (Box::new(tcp), "plain"),
                    Some(slot) => {
                        let (cfg, stem) = slot.lock().unwrap().clone();
                        let conn = ServerConnection::new(cfg).unwrap();
                        (Box::new(StreamOwned::new(conn, tcp)), stem)
                    }
                };
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // Head, then a Content-Length body if any. Over TLS the handshake runs in the
                // first read; a client refusing the certificate ends it with an error.
                let req = loop {
                    match s.read(&mut tmp) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
                        if buf.len() >= p + 4 + len {
                            break Some(buf.clone());
                        }
                    }
                };
                let Some(req) = req else { continue };
                sv.lock().unwrap().push(label);
                let Some(resp) = answer(&req) else { continue };
                let body_at = resp
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(resp.len(), |p| p + 4);
                if split && body_at < resp.len() {
                    let _ = s.write_all(&resp[..body_at]).and_then(|_| s.flush());
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = s.write_all(&resp[body_at..]).and_then(|_| s.flush());
                } else {
                    let _ = s.write_all(&resp).and_then(|_| s.flush());
                }
            }
        });
        Loopback {
            addr,
            conns,
            served,
            stop,
        }
    }

    fn hits(&self) -> usize {
        self.served.lock().unwrap().len()
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Whether a request was read over a connection presenting certificate `stem`.
    fn served_with(&self, stem: &str) -> bool {
        self.served.lock().unwrap().contains(&stem)
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn json_response(status: u16, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn jwks_url_rotation_grace_and_key_server_down() {
    for d in DRIVERS {
        let jwk1 = std::fs::read_to_string(data("rsa_jwk.json")).unwrap();
        let jwk2 = std::fs::read_to_string(data("rsa2_jwk.json")).unwrap();
        // What the key server serves; None: it is down (500).
        let serving: Arc<Mutex<Option<String>>> =
            Arc::new(Mutex::new(Some(format!("{{\"keys\": [{jwk1}]}}"))));
        let s = serving.clone();
        let keys = Loopback::start(move |_| {
            Some(match &*s.lock().unwrap() {
                Some(set) => json_response(200, set, "cache-control: max-age=3600\r\n"),
                None => json_response(500, "{}", ""),
            })
        });
        let up = Upstream::echo();
        let cfg = config(
            &[up.addr],
            &format!(
                r#"
[auth.jwt.idp]
jwks_url = "http://{}/.well-known/jwks.json"
jwks_min_refresh_interval = "100ms"
jwks_grace = "1h"

[[routes]]
upstream = "up"
auth = "idp"
"#,
                keys.addr
            ),
        );
        let gw = TestGateway::start(&cfg, d);
        let t1 = rs(&alice(), "rsa_private.pem", "rsa");
        let t2 = rs(&alice(), "rsa2_private.pem", "rsa2");
        let status = |t: &str| get_with(gw.addr, "/", &bearer(t)).status;
        // The first fetch runs in the background.
        assert!(
            eventually(Duration::from_secs(10), || status(&t1) == 200),
            "{d:?}"
        );
        assert_eq!(status(&t2), 401);
        // Rotation: the server now has only key 2. The unknown kid asks for a refresh.
        *serving.lock().unwrap() = Some(format!("{{\"keys\": [{jwk2}]}}"));
        assert!(
            eventually(Duration::from_secs(10), || status(&t2) == 200),
            "{d:?}"
        );
        // Key 1 is gone from the set but within its grace period.
        let fresh1 = rs(
            &with(alice(), "sub", json!("bob")),
            "rsa_private.pem",
            "rsa",
        );
        assert_eq!(
            status(&fresh1),
            200,
            "{d:?}: the old key is kept for the grace period"
        );
        // Key server down: an unknown kid asks for refreshes that fail; the last keys serve on.
        *serving.lock().unwrap() = None;
        let before = keys.hits();
        let unknown = rs(&alice(), "rsa_private.pem", "rsa3");
        assert!(
            eventually(Duration::from_secs(10), || {
                assert_eq!(status(&unknown), 401);
                keys.hits() > before
            }),
            "{d:?}: no refresh was attempted"
        );
        assert_eq!(status(&t2), 200, "{d:?}");
        let fresh2 = rs(
            &with(alice(), "sub", json!("carol")),
            "rsa2_private.pem",
            "rsa2",
        );
        assert_eq!(status(&fresh2), 200, "{d:?}");
    }
}

#[test]
fn jwks_grace_period_ends() {
    let jwk1 = std::fs::read_to_string(data("rsa_jwk.json")).unwrap();
    let jwk2 = std::fs::read_to_string(data("rsa2_jwk.json")).unwrap();
    let serving = Arc::new(Mutex::new(format!("{{\"keys\": [{jwk1}]}}")));
    let s = serving.clone();
    let keys = Loopback::start(move |_| Some(json_response(200, &s.lock().unwrap(), "")));
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.jwt.idp]\njwks_url = \"http://{}/jwks\"\njwks_min_refresh_interval = \"100ms\"\njwks_grace = \"1s\"\n[auth]\ncache_max_ttl = \"1s\"\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n",
            keys.addr
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let t1 = rs(&alice(), "rsa_private.pem", "rsa");
    let t2 = rs(&alice(), "rsa2_private.pem", "rsa2");
    let status = |t: &str| get_with(gw.addr, "/", &bearer(t)).status;
    assert!(eventually(Duration::from_secs(10), || status(&t1) == 200));
    *serving.lock().unwrap() = format!("{{\"keys\": [{jwk2}]}}");
    assert!(eventually(Duration::from_secs(10), || status(&t2) == 200));
    // After the grace period (and the cache lifetime), key 1 is refused.
    assert!(eventually(Duration::from_secs(10), || status(&t1) == 401));
    assert_eq!(status(&t2), 200);
}

/// An identity provider that empties its JWK Set (`{"keys": []}`, or only keys the gateway
/// cannot use) revokes its keys (RFC 7517 §5: the set is the provider's current keys): they
/// leave service after `jwks_grace`, as keys leaving in a rotation do, instead of serving on
/// forever as if the key server were down; the set is asked for again meanwhile, and keys
/// that come back serve again.
#[test]
fn an_empty_jwks_retires_the_keys_after_the_grace_period_rfc7517_5() {
    let jwk1 = std::fs::read_to_string(data("rsa_jwk.json")).unwrap();
    let with_key = format!("{{\"keys\": [{jwk1}]}}");
    let serving = Arc::new(Mutex::new(with_key.clone()));
    let s = serving.clone();
    let keys = Loopback::start(move |_| Some(json_response(200, &s.lock().unwrap(), "")));
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.jwt.idp]\njwks_url = \"http://{}/jwks\"\njwks_min_refresh_interval = \"100ms\"\njwks_grace = \"1s\"\n[auth]\ncache_max_ttl = \"1s\"\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n",
            keys.addr
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    // A new token each time (another subject), so that no cached verification answers.
    let n = AtomicUsize::new(0);
    let status = || {
        let sub = format!("u{}", n.fetch_add(1, Ordering::Relaxed));
        let t = rs(&with(alice(), "sub", json!(sub)), "rsa_private.pem", "rsa");
        get_with(gw.addr, "/", &bearer(&t)).status
    };
    assert!(eventually(Duration::from_secs(10), || status() == 200));
    assert!(jwk1.contains("\"use\": \"sig\""));
    for empty in [
        r#"{"keys": []}"#.to_string(),
        // Only a key of another use: nothing to verify with either.
        format!(
            "{{\"keys\": [{}]}}",
            jwk1.replace("\"use\": \"sig\"", "\"use\": \"enc\"")
        ),
    ] {
        *serving.lock().unwrap() = empty.clone();
        let before = keys.hits();
        // The fetcher is asked for the set again by the next unknown kid at the latest; after
        // the grace period the key is refused.
        let unknown = rs(&alice(), "rsa_private.pem", "rsa-new");
        assert!(
            eventually(Duration::from_secs(10), || {
                let _ = get_with(gw.addr, "/", &bearer(&unknown));
                keys.hits() > before && status() == 401
            }),
            "a key the provider no longer publishes is still accepted ({empty})"
        );
        // The provider publishes it again: it serves again.
        *serving.lock().unwrap() = with_key.clone();
        assert!(
            eventually(Duration::from_secs(10), || status() == 200),
            "the key is back in the set but refused ({empty})"
        );
    }
}

#[test]
fn introspection_active_inactive_cached_and_down() {
    for d in DRIVERS {
        let exp = now() + 600;
        let seen_auth = Arc::new(Mutex::new(Vec::<String>::new()));
        let sa = seen_auth.clone();
        let idp = Loopback::start(move |req| {
            let text = String::from_utf8_lossy(req).to_string();
            if let Some(l) = text
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            {
                sa.lock().unwrap().push(l.to_string());
            }
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            let answer = if body.starts_with("token=opaque-good&") {
                json!({"active": true, "sub": "svc-1", "scope": "read", "exp": exp, "client_id": "c1"})
            } else {
                json!({"active": false})
            };
            Some(json_response(200, &answer.to_string(), ""))
        });
        let up = Upstream::echo();
        let cfg = config(
            &[up.addr],
            &format!(
                r#"
[auth.introspection.idp]
url = "http://{}/introspect"
client_id = "gateway"
client_secret = "s3cret"
forward_claims = {{ sub = "x-user-id" }}

[[routes]]
upstream = "up"
auth = {{ any_of = ["idp"], scopes_all = ["read"] }}
"#,
                idp.addr
            ),
        );
        let gw = TestGateway::start(&cfg, d);
        for _ in 0..3 {
            let r = get_with(gw.addr, "/", &bearer("opaque-good"));
            assert_eq!(r.status, 200, "{d:?}: {}", r.text());
            assert_eq!(up.last().header("x-user-id"), Some("svc-1"));
            assert_eq!(up.last().header("authorization"), None);
        }
        assert_eq!(
            idp.hits(),
            1,
            "{d:?}: repeated tokens are answered from the cache"
        );
        // Basic base64("gateway:s3cret").
        assert_eq!(
            seen_auth.lock().unwrap()[0].trim(),
            "authorization: Basic Z2F0ZXdheTpzM2NyZXQ="
        );
        let r = get_with(gw.addr, "/", &bearer("opaque-revoked"));
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["message"], "the token is not active");
        assert_eq!(get_with(gw.addr, "/", "").status, 401);
        // The endpoint goes away: a 503 with Retry-After, never a hang.
        drop(idp);
        let r = get_with(gw.addr, "/", &bearer("opaque-other"));
        assert_eq!(r.status, 503, "{d:?}");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"], "auth_unavailable");
        // The cached answer still serves.
        assert_eq!(get_with(gw.addr, "/", &bearer("opaque-good")).status, 200);
    }
}

#[test]
fn introspection_endpoint_refusing_connections_is_503() {
    // A port with nothing listening.
    let refusing = refusing_addr();
    let addr = refusing.addr;
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.introspection.idp]\nurl = \"http://{addr}/i\"\nclient_id = \"g\"\nclient_secret = \"s\"\ntimeout = \"500ms\"\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n"
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let r = get_with(gw.addr, "/", &bearer("opaque"));
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(up.hits(), 0);
}

/// Over `max_concurrent` calls in flight on a worker, a request is answered 503 at once
/// instead of queueing behind a slow endpoint.
#[test]
fn introspection_calls_in_flight_are_bounded_per_worker() {
    let release = Arc::new(AtomicBool::new(false));
    let r = release.clone();
    let idp = Loopback::start(move |_| {
        // Holds the first call until the test releases it (bounded wait).
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !r.load(Ordering::SeqCst) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(json_response(200, r#"{"active": true, "sub": "s"}"#, ""))
    });
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.introspection.idp]\nurl = \"http://{}/i\"\nclient_id = \"g\"\nclient_secret = \"s\"\nmax_concurrent = 1\ntimeout = \"20s\"\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n",
            idp.addr
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let addr = gw.addr;
    let first = std::thread::spawn(move || get_with(addr, "/", &bearer("slow-token")).status);
    assert!(eventually(Duration::from_secs(10), || idp.hits() == 1));
    let r = get_with(gw.addr, "/", &bearer("other-token"));
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    release.store(true, Ordering::SeqCst);
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(
        idp.hits(),
        1,
        "the refused request never reached the endpoint"
    );
}

/// Rate limits keyed by the consumer the auth stage found, or by a claim of the token.
#[test]
fn rate_limits_by_consumer_and_by_claim() {
    let up = Upstream::echo();
    let toml = config(
        &[up.addr],
        &format!(
            r#"
[auth.jwt.jwt]
secret = "{SECRET}"

[[consumers]]
name = "alice-app"
jwt_subjects = ["alice"]

[[consumers]]
name = "carol-app"
jwt_subjects = ["carol"]

[[routes]]
path_prefix = "/per-consumer"
upstream = "up"
auth = "jwt"
rate_limits = [{{ key = "consumer", rate = 2, per = "1m" }}]

[[routes]]
path_prefix = "/per-tenant"
upstream = "up"
auth = "jwt"
rate_limits = [{{ key = "claim:tenant", rate = 3, per = "1m" }}]
"#
        ),
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let token =
        |sub: &str, tenant: &str| hs(&json!({"sub": sub, "tenant": tenant, "exp": now() + 600}));
    let status = |path: &str, t: &str| get_with(gw.addr, path, &bearer(t)).status;
    let (alice, carol) = (token("alice", "t1"), token("carol", "t1"));
    let a: Vec<u16> = (0..3).map(|_| status("/per-consumer", &alice)).collect();
    assert_eq!(a, vec![200, 200, 429], "alice-app has 2 a minute");
    let r = get_with(gw.addr, "/per-consumer", &bearer(&alice));
    assert_eq!(r.header("ratelimit-policy"), Some("\"consumer\";q=2;w=60"));
    let c: Vec<u16> = (0..2).map(|_| status("/per-consumer", &carol)).collect();
    assert_eq!(c, vec![200, 200], "carol-app has a bucket of its own");
    // Tenant t1 has 3 a minute, whoever the subject; t2 is counted apart.
    let t: Vec<u16> = [&alice, &carol, &alice, &carol]
        .iter()
        .map(|tok| status("/per-tenant", tok))
        .collect();
    assert_eq!(t, vec![200, 200, 200, 429]);
    assert_eq!(status("/per-tenant", &token("erin", "t2")), 200);
    // A null tenant is no tenant (as a null required claim is missing, RFC 7519 §4): such
    // callers are counted by address with those that have none, not all in one "null" bucket.
    let null_tenant = hs(&json!({"sub": "erin", "tenant": null, "exp": now() + 600}));
    let no_tenant = hs(&json!({"sub": "erin", "exp": now() + 600}));
    let n: Vec<u16> = [&null_tenant, &null_tenant, &null_tenant, &no_tenant]
        .iter()
        .map(|tok| status("/per-tenant", tok))
        .collect();
    assert_eq!(n, vec![200, 200, 200, 429]);
    // A key that needs a caller is refused on a route without auth.
    let e = ringway::config::Config::parse(
        &config(
            &[up.addr],
            "[[routes]]\nupstream = \"up\"\nrate_limits = [{ key = \"consumer\", rate = 1 }]\n",
        ),
        "gw.toml",
    )
    .unwrap_err();
    assert_eq!(e.key, "routes[0].rate_limits[0].key");
    assert!(e.reason.contains("auth policy"), "{e}");
}

/// Routes match raw path bytes, so spellings that an upstream would normalise into a protected
/// path are refused before routing: no way around an auth route through an open one.
#[test]
fn ambiguous_paths_cannot_slip_past_an_auth_route() {
    let up = Upstream::echo();
    let toml = config(
        &[up.addr],
        &format!(
            "[auth.jwt.jwt]\nsecret = \"{SECRET}\"\n\
             [[routes]]\npath_prefix = \"/admin\"\nupstream = \"up\"\nauth = \"jwt\"\n\
             [[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\n"
        ),
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    assert_eq!(get(gw.addr, "/admin/users").status, 401);
    for path in [
        "/public/../admin/users",
        "/%61dmin/users",
        "/./admin/users",
        "/x/%2e%2e/admin",
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        let r = c.read_response().expect("an answer");
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["error"], "bad_request", "{path}");
        assert!(
            c.is_closed(Duration::from_secs(2)),
            "{path}: closed after a 400"
        );
    }
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    assert_eq!(get(gw.addr, "/public/page").status, 200);
}

// ---------------------------------------------------------------------------------------------
// https key servers and introspection endpoints (certificates from `support::pki`).

/// A gateway whose JWT provider fetches `https://{keys}/jwks`, verified against `ca`; `/open`
/// needs no credentials.
fn https_jwks_gateway(up: SocketAddr, keys: SocketAddr, ca: &str) -> String {
    config(
        &[up],
        &format!(
            r#"
[auth.jwt.idp]
jwks_url = "https://{keys}/jwks"
ca = "{ca}"
jwks_min_refresh_interval = "100ms"

[[routes]]
path_prefix = "/open"
upstream = "up"

[[routes]]
upstream = "up"
auth = "idp"
"#
        ),
    )
}

#[test]
fn jwks_url_over_https_verifies_the_key_server_certificate() {
    let jwk1 = std::fs::read_to_string(data("rsa_jwk.json")).unwrap();
    let set = format!("{{\"keys\": [{jwk1}]}}");
    let answer = move |_: &[u8]| Some(json_response(200, &set, "cache-control: max-age=3600\r\n"));
    let up = Upstream::echo();
    let t1 = rs(&alice(), "rsa_private.pem", "rsa");

    // The right CA: the set is fetched over TLS and its key verifies tokens.
    let cert = cert_slot("loopback");
    let keys = Loopback::start_tls(cert.clone(), false, answer.clone());
    let gw = TestGateway::start(
        &https_jwks_gateway(up.addr, keys.addr, &pki::pki().path("ca.pem")),
        DriverChoice::Auto,
    );
    let status = |addr: SocketAddr, t: &str| get_with(addr, "/", &bearer(t)).status;
    assert!(eventually(Duration::from_secs(10), || status(gw.addr, &t1) == 200));
    assert!(keys.served_with("loopback"));

    // The key server now presents a certificate of another CA. An unknown kid asks for
    // refreshes; each fails at the handshake and the last good keys stay in service.
    *cert.lock().unwrap() = (pki::server_config("loopback-other"), "loopback-other");
    let before = keys.conns();
    let unknown = rs(&alice(), "rsa_private.pem", "rsa3");
    assert!(
        eventually(Duration::from_secs(10), || {
            assert_eq!(status(gw.addr, &unknown), 401);
            // Fetches run one after another: a second connection means the first ended.
            keys.conns() >= before + 2
        }),
        "no refresh was attempted"
    );
    assert!(
        !keys.served_with("loopback-other"),
        "a request went over a certificate the CA does not vouch for"
    );
    let fresh = rs(
        &with(alice(), "sub", json!("bob")),
        "rsa_private.pem",
        "rsa",
    );
    assert_eq!(status(gw.addr, &fresh), 200, "the last good keys are kept");
    drop(gw);

    // The wrong CA from the start: no key set ever, tokens are refused, the gateway serves on.
    let keys = Loopback::start_tls(cert_slot("loopback"), false, answer);
    let wrong = pki::pki().path("other-ca.pem");
    let gw = TestGateway::start(
        &https_jwks_gateway(up.addr, keys.addr, &wrong),
        DriverChoice::Auto,
    );
    assert!(eventually(Duration::from_secs(10), || keys.conns() >= 2));
    let r = get_with(gw.addr, "/", &bearer(&t1));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "the token could not be verified");
    assert_eq!(
        keys.hits(),
        0,
        "no request went over an unverified connection"
    );
    assert_eq!(get(gw.addr, "/open").status, 200);
    assert_eq!(status(gw.addr, &t1), 401);
}

#[test]
fn introspection_over_https_verifies_the_endpoint_certificate() {
    for d in DRIVERS {
        let exp = now() + 600;
        // Answers arrive in two TLS records, head then body, read in two pieces.
        let idp = Loopback::start_tls(cert_slot("loopback"), true, move |req| {
            let text = String::from_utf8_lossy(req).to_string();
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            let answer = if body.starts_with("token=opaque-good&") {
                json!({"active": true, "sub": "svc-1", "scope": "read", "exp": exp})
            } else {
                json!({"active": false})
            };
            Some(json_response(200, &answer.to_string(), ""))
        });
        let up = Upstream::echo();
        let gateway = |ca: &str| {
            config(
                &[up.addr],
                &format!(
                    r#"
[auth.introspection.idp]
url = "https://{}/introspect"
ca = "{ca}"
client_id = "gateway"
client_secret = "s3cret"
forward_claims = {{ sub = "x-user-id" }}

[[routes]]
upstream = "up"
auth = "idp"
"#,
                    idp.addr
                ),
            )
        };
        let gw = TestGateway::start(&gateway(&pki::pki().path("ca.pem")), d);
        let r = get_with(gw.addr, "/", &bearer("opaque-good"));
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_eq!(up.last().header("x-user-id"), Some("svc-1"));
        let r = get_with(gw.addr, "/", &bearer("opaque-revoked"));
        assert_eq!(r.status, 401, "{d:?}");
        assert_eq!(r.json()["message"], "the token is not active");
        assert_eq!(idp.hits(), 2, "{d:?}");
        assert!(idp.served_with("loopback"));
        drop(gw);

        // The wrong CA: the handshake fails, which is the 503 of an unreachable endpoint.
        let gw = TestGateway::start(&gateway(&pki::pki().path("other-ca.pem")), d);
        let conns = idp.conns();
        let r = get_with(gw.addr, "/", &bearer("opaque-good"));
        assert_eq!(r.status, 503, "{d:?}: {}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"], "auth_unavailable");
        assert!(idp.conns() > conns, "{d:?}: no TLS connection was tried");
        assert_eq!(
            idp.hits(),
            2,
            "{d:?}: the token went over an unverified connection"
        );
        assert_eq!(up.hits(), 1, "{d:?}");
    }
}

#[test]
fn https_ca_files_are_checked_at_load() {
    let parse = |extra: &str| {
        ringway::config::Config::parse(
            &config(&["127.0.0.1:9".parse().unwrap()], extra),
            "auth.toml",
        )
    };
    let p = pki::pki();
    let e = parse(
        "[auth.jwt.a]\njwks_url = \"https://127.0.0.1:9/jwks\"\nca = \"/nonexistent/ca.pem\"\n",
    )
    .unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.key.as_str()),
        ("auth.toml", "auth.jwt.a.ca")
    );
    assert!(
        e.reason.contains("/nonexistent/ca.pem") && e.reason.contains("cannot read"),
        "{e}"
    );
    assert!(e.line.is_some(), "{e}");
    // A key file is no CA bundle.
    let intro = |url: &str, ca: &str| {
        format!("[auth.introspection.i]\nurl = \"{url}\"\nca = \"{ca}\"\nclient_id = \"g\"\nclient_secret = \"s3cret\"\n")
    };
    let e = parse(&intro("https://127.0.0.1:9/i", &p.path("loopback.key"))).unwrap_err();
    assert_eq!(e.key, "auth.introspection.i.ca");
    assert!(
        e.reason.contains("loopback.key") && e.reason.contains("no CERTIFICATE"),
        "{e}"
    );
    assert!(!e.to_string().contains("s3cret"), "{e}");
    // A CA for a plain-HTTP URL or a provider without a URL would be ignored: refused.
    let e = parse(&intro("http://127.0.0.1:9/i", &p.path("ca.pem"))).unwrap_err();
    assert_eq!(e.key, "auth.introspection.i.ca");
    assert!(e.reason.contains("https://"), "{e}");
    let e = parse(&format!(
        "[auth.jwt.a]\nsecret = \"{SECRET}\"\nca = \"{}\"\n",
        p.path("ca.pem")
    ))
    .unwrap_err();
    assert_eq!(e.key, "auth.jwt.a.ca");
    // Without `ca`, https URLs are verified against the webpki roots.
    parse("[auth.jwt.a]\njwks_url = \"https://127.0.0.1:9/jwks\"\n").unwrap();
    parse(&format!(
        "{}\n[auth.jwt.b]\njwks_url = \"https://127.0.0.1:9/jwks\"\nca = \"{}\"\n",
        intro("https://127.0.0.1:9/i", &p.path("ca.pem")),
        p.path("ca.pem")
    ))
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Review r3-auth: symmetric JWKS keys, unknown kids beside kid-less keys, kid-less keys across
// refreshes, introspection `exp` forms, claims forwarded into identity headers.

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An HS token with header kid `kid`, signed with `key`.
fn hs_kid(claims: &Value, alg: Algorithm, kid: &str, key: &[u8]) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    encode(&h, claims, &EncodingKey::from_secret(key)).unwrap()
}

/// A token of `alg` (RSA, EC or EdDSA) with header kid `kid`, signed with the PEM private key
/// `key_file` of `tests/data/auth`.
fn signed(alg: Algorithm, key_file: &str, kid: &str) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    let pem = std::fs::read(data(key_file)).unwrap();
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    };
    encode(&h, &alice(), &key.unwrap()).unwrap()
}

/// A JWK of `tests/data/auth` without its kid (and with `kid` when given).
fn jwk_with_kid(file: &str, kid: Option<&str>) -> Value {
    let mut k: Value = serde_json::from_str(&std::fs::read_to_string(data(file)).unwrap()).unwrap();
    let o = k.as_object_mut().unwrap();
    o.remove("kid");
    if let Some(kid) = kid {
        o.insert("kid".into(), json!(kid));
    }
    k
}

/// RFC 7518 §3.2: an HMAC key must be at least as long as the hash output (32, 48, 64 bytes
/// for HS256/384/512). In a `jwks_file`, a shorter symmetric key (even an empty one) is a
/// config error naming the file and the key, as for `secret`. From a `jwks_url`, symmetric
/// keys are not used at all (a published set is readable by anyone, who could then sign
/// tokens), and the other keys of the set serve on.
#[test]
fn short_symmetric_jwks_keys_are_refused_and_fetched_ones_unused_rfc7518_3_2() {
    let dir = std::env::temp_dir().join(format!("ringway-oct-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    let file_cfg = |up: SocketAddr| {
        config(
            &[up],
            &format!(
                "[auth.jwt.f]\njwks_file = \"{}\"\n[[routes]]\npath = \"/f\"\nupstream = \"up\"\nauth = \"f\"\n",
                file.display()
            ),
        )
    };
    for (alg, need, len) in [
        ("HS256", 32, 0),
        ("HS256", 32, 1),
        ("HS256", 32, 31),
        ("HS384", 48, 47),
        ("HS512", 64, 32),
    ] {
        let set = json!({"keys": [
            {"kty": "RSA", "kid": "ok", "n": "qdN-byVxUlz-nrcPIIBbVz-c5DO1DuRZc-HtBQRYq3xRbAjI7ZnsHJtWLlWEncdu2EKdyie-Oif6egK1iWw2Y5rXUvlbQ9WMuuAxIX-7cHQGXba0yur3FS20G5IKaWZJl393_n9jWbQLmJ7oeS8zFh6SLahTHM5C2b-wkKyiWVSo9HWr3F7xbE3T7irbf_ic6ptPg7VcuDU1nz4zJHgeTeWfYJYYibtldMiCr5NhKMhPIs71yoQJIT_z3vVBBEihyP6t2L7hhXGTQGZn4PxWo8LvU2qy0tY7SQpw8LVJ1s339zGehqyv9pVlUJR8KL6KEJ6wWDB3CYrIfk3ruQbDxQ", "e": "AQAB"},
            {"kty": "oct", "kid": "short", "alg": alg, "k": b64url(&vec![7u8; len])}
        ]});
        std::fs::write(&file, set.to_string()).unwrap();
        let e = ringway::config::Config::parse(&file_cfg("127.0.0.1:9".parse().unwrap()), "t.toml")
            .unwrap_err();
        assert_eq!(e.key, "auth.jwt.f.jwks_file", "{alg} {len}: {e}");
        assert!(
            e.reason
                .contains(&format!("{alg} needs a key of at least {need} bytes"))
                && e.reason.contains("RFC 7518 §3.2")
                && e.reason.contains("kid \"short\"")
                && e.reason.contains(&format!("this one has {len}"))
                && e.reason.contains(&file.display().to_string()),
            "{alg} {len}: {e}"
        );
    }
    // Long enough: loaded, and its tokens verify.
    let secret = [9u8; 32];
    std::fs::write(
        &file,
        json!({"keys": [{"kty": "oct", "kid": "k", "alg": "HS256", "k": b64url(&secret)}]})
            .to_string(),
    )
    .unwrap();
    let up = Upstream::echo();
    let gw = TestGateway::start(&file_cfg(up.addr), DriverChoice::Auto);
    let t = hs_kid(&alice(), Algorithm::HS256, "k", &secret);
    assert_eq!(get_with(gw.addr, "/f", &bearer(&t)).status, 200);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);

    // A fetched set: an RSA key, an empty and a 1-byte HS256 key, and a 64-byte one.
    let long = [5u8; 64];
    let set = json!({"keys": [
        jwk_with_kid("rsa_jwk.json", Some("rsa")),
        {"kty": "oct", "kid": "empty", "alg": "HS256", "k": ""},
        {"kty": "oct", "kid": "tiny", "alg": "HS256", "k": "aw"},
        {"kty": "oct", "kid": "long", "alg": "HS256", "k": b64url(&long)}
    ]})
    .to_string();
    let keys = Loopback::start(move |_| Some(json_response(200, &set, "")));
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.jwt.u]\njwks_url = \"http://{}/jwks\"\njwks_min_refresh_interval = \"100ms\"\n[[routes]]\nupstream = \"up\"\nauth = \"u\"\n",
            keys.addr
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let status = |t: &str| get_with(gw.addr, "/", &bearer(t));
    let rsa = rs(&alice(), "rsa_private.pem", "rsa");
    assert!(
        eventually(Duration::from_secs(10), || status(&rsa).status == 200),
        "the set's other keys serve"
    );
    let mallory = with(alice(), "sub", json!("mallory"));
    let served = up.hits();
    for (kid, key) in [
        ("empty", &b""[..]),
        ("tiny", &b"k"[..]),
        ("long", &long[..]),
    ] {
        let r = status(&hs_kid(&mallory, Algorithm::HS256, kid, key));
        assert_eq!(r.status, 401, "kid {kid}: {}", r.text());
        assert_eq!(
            r.json()["message"],
            "the token could not be verified",
            "{kid}"
        );
    }
    assert_eq!(up.hits(), served);
}

/// RFC 6750 §3 (error="invalid_token" for a token that cannot be verified) and RFC 7515
/// §4.1.4: the client-facing 401 is the same for every failure to verify a token with a key
/// (a kid that names no key, a wrong signature, an algorithm its key does not allow, a
/// signature that does not decode), so that a client cannot find out which kids exist, or
/// which algorithm each has, by sending tokens it made up.
#[test]
fn rfc6750_3_a_401_does_not_tell_an_unknown_kid_from_a_bad_signature() {
    let dir = std::env::temp_dir().join(format!("ringway-kid-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    let secret = [3u8; 32];
    std::fs::write(
        &file,
        json!({"keys": [
            {"kty": "oct", "kid": "hs", "alg": "HS256", "k": b64url(&secret)},
            jwk_with_kid("rsa_jwk.json", Some("rsa"))
        ]})
        .to_string(),
    )
    .unwrap();
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.jwt.f]\njwks_file = \"{}\"\n[[routes]]\nupstream = \"up\"\nauth = \"f\"\n",
            file.display()
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let ok = rs(&alice(), "rsa_private.pem", "rsa");
    assert_eq!(get_with(gw.addr, "/", &bearer(&ok)).status, 200);
    assert_eq!(
        get_with(
            gw.addr,
            "/",
            &bearer(&hs_kid(&alice(), Algorithm::HS256, "hs", &secret))
        )
        .status,
        200
    );
    let undecodable = format!("{}.AAAAA", ok.rsplit_once('.').unwrap().0);
    let cases = [
        (
            "unknown kid, HS256",
            hs_kid(&alice(), Algorithm::HS256, "nope", &[4u8; 32]),
        ),
        (
            "unknown kid, RS256",
            rs(&alice(), "rsa2_private.pem", "nope"),
        ),
        (
            "known kid, wrong secret",
            hs_kid(&alice(), Algorithm::HS256, "hs", &[4u8; 32]),
        ),
        (
            "known kid, other algorithm",
            hs_kid(&alice(), Algorithm::HS512, "hs", &[3u8; 64]),
        ),
        (
            "RSA kid, HS256 token",
            hs_kid(&alice(), Algorithm::HS256, "rsa", &secret),
        ),
        (
            "known kid, wrong RSA key",
            rs(&alice(), "rsa2_private.pem", "rsa"),
        ),
        ("known kid, signature not base64url", undecodable),
        // No key of the set looks at these (checked against a stand-in key of their
        // algorithm, whose verdict is thrown away): the same answer, even for a token the
        // stand-in's own private key signed.
        (
            "unknown kid, HS512",
            hs_kid(&alice(), Algorithm::HS512, "nope", &[0x5a; 64]),
        ),
        (
            "unknown kid, ES256",
            signed(Algorithm::ES256, "ec256_private.pem", "nope"),
        ),
        (
            "unknown kid, ES384, the stand-in's key",
            signed(Algorithm::ES384, "stand_in_ec384_private.pem", "nope"),
        ),
        (
            "unknown kid, EdDSA, the stand-in's key",
            signed(Algorithm::EdDSA, "stand_in_ed25519_private.pem", "nope"),
        ),
        (
            "unknown kid, PS256, the stand-in's key",
            signed(Algorithm::PS256, "stand_in_rsa_private.pem", "nope"),
        ),
        (
            "RSA kid, ES256 token",
            signed(Algorithm::ES256, "stand_in_ec256_private.pem", "rsa"),
        ),
    ];
    let answer = |r: &Resp| {
        let mut j = r.json();
        let o = j.as_object_mut().unwrap();
        o.remove("request_id");
        o.remove("trace_id");
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| !["date", "x-request-id"].contains(&k.to_ascii_lowercase().as_str()))
            .cloned()
            .collect();
        h.sort();
        (r.status, h, j)
    };
    let first = answer(&get_with(gw.addr, "/", &bearer(&cases[0].1)));
    assert_eq!(first.0, 401);
    assert_eq!(first.2["error"], "invalid_token");
    assert_eq!(first.2["message"], "the token could not be verified");
    assert!(first.1.contains(&(
        "www-authenticate".to_string(),
        "Bearer realm=\"ringway\", error=\"invalid_token\"".to_string()
    )));
    for (what, token) in &cases[1..] {
        let r = get_with(gw.addr, "/", &bearer(token));
        assert_eq!(answer(&r), first, "{what}: {}", r.text());
    }
    assert_eq!(up.hits(), 2);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key server that serves what `serving` holds (`max-age` an hour), and a gateway whose
/// route `/` takes tokens of provider `idp` from it (`jwks_min_refresh_interval` 100 ms;
/// `extra`: more lines of `[auth.jwt.idp]`). The key server and the upstream live as long as
/// the gateway is used.
fn served_jwks_gateway(
    serving: &Arc<Mutex<String>>,
    extra: &str,
) -> (Loopback, Upstream, TestGateway) {
    let s = serving.clone();
    let keys = Loopback::start(move |_| {
        Some(json_response(
            200,
            &s.lock().unwrap(),
            "cache-control: max-age=3600\r\n",
        ))
    });
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.jwt.idp]\njwks_url = \"http://{}/jwks\"\njwks_min_refresh_interval = \"100ms\"\n{extra}[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n",
            keys.addr
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    (keys, up, gw)
}

/// RFC 7515 §4.1.4, RFC 7517 §4.5: during a rotation the kid names the new key. A token whose
/// kid names no key of the set is refused as signed by an unknown key, and asks for the set
/// again, even when the set holds keys without a kid (tried, as an issuer may publish keys
/// without kids, and failed): the rotated-in key is used as soon as it is fetched, not at
/// the next scheduled refresh (an hour here).
#[test]
fn an_unknown_kid_asks_for_the_set_again_beside_keys_without_kid_rfc7515_4_1_4() {
    let serving = Arc::new(Mutex::new(
        json!({"keys": [jwk_with_kid("rsa_jwk.json", None)]}).to_string(),
    ));
    let (keys, _up, gw) = served_jwks_gateway(&serving, "");
    let get = |t: &str| get_with(gw.addr, "/", &bearer(t));
    // The kid-less key verifies a token whatever kid it names.
    let t1 = rs(&alice(), "rsa_private.pem", "rsa");
    assert!(eventually(Duration::from_secs(10), || get(&t1).status == 200));
    let fetched = keys.hits();
    // The issuer rotates a key in under a new kid.
    *serving.lock().unwrap() = json!({"keys": [
        jwk_with_kid("rsa_jwk.json", None),
        jwk_with_kid("rsa2_jwk.json", Some("rsa2"))
    ]})
    .to_string();
    let t2 = rs(&alice(), "rsa2_private.pem", "rsa2");
    let r = get(&t2);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "the token could not be verified");
    assert!(
        eventually(Duration::from_secs(10), || get(&t2).status == 200),
        "the unknown kid did not bring the new key in"
    );
    assert!(keys.hits() > fetched);
    // A kid naming no key, signed by no key of the set: unknown, not a bad signature.
    let t3 = rs(&alice(), "rsa3_private.pem", "rsa3");
    assert_eq!(
        get(&t3).json()["message"],
        "the token could not be verified"
    );
}

/// Keys without a kid that stay in a fetched set are the same keys at the next fetch (matched
/// by their key material): they are not moved to the grace list at every refresh. Copies
/// piling up there would push a key that did leave the set (and is in its grace period) past
/// the few keys a token without a kid may try.
#[test]
fn kidless_keys_that_stay_in_the_set_are_not_retired_at_each_refresh() {
    let a = jwk_with_kid("rsa_jwk.json", None);
    let b = jwk_with_kid("rsa2_jwk.json", None);
    let c = jwk_with_kid("rsa3_jwk.json", None);
    // A marker: key A's material under a kid, for PS256 only (a kid-less RS256 key does not
    // verify a PS256 token): a token naming it passes once the second set is in service.
    let mut marker = jwk_with_kid("rsa_jwk.json", Some("marker"));
    marker["alg"] = json!("PS256");
    let serving = Arc::new(Mutex::new(
        json!({"keys": [a.clone(), b.clone(), c]}).to_string(),
    ));
    let (keys, _up, gw) = served_jwks_gateway(&serving, "jwks_grace = \"1h\"\n");
    let get = |t: &str| get_with(gw.addr, "/", &bearer(t)).status;
    // Tokens without a kid, each new (no cache hit), signed by key C.
    let n = std::cell::Cell::new(0);
    let by_c = || {
        n.set(n.get() + 1);
        let key =
            EncodingKey::from_rsa_pem(&std::fs::read(data("rsa3_private.pem")).unwrap()).unwrap();
        encode(
            &Header::new(Algorithm::RS256),
            &with(alice(), "jti", json!(n.get())),
            &key,
        )
        .unwrap()
    };
    assert!(eventually(Duration::from_secs(10), || get(&by_c()) == 200));
    // Refreshes of the same set, asked for by a kid no key has (an ES256 token: no key of
    // the set verifies it).
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("nobody".into());
    let ec = EncodingKey::from_ec_pem(&std::fs::read(data("ec256_private.pem")).unwrap()).unwrap();
    let unknown = encode(&h, &alice(), &ec).unwrap();
    assert!(eventually(Duration::from_secs(20), || {
        assert_eq!(get(&unknown), 401);
        keys.hits() >= 3
    }));
    // Key C leaves the set; the marker comes in.
    *serving.lock().unwrap() = json!({"keys": [a, b, marker]}).to_string();
    let mut h = Header::new(Algorithm::PS256);
    h.kid = Some("marker".into());
    let m = encode(
        &h,
        &alice(),
        &EncodingKey::from_rsa_pem(&std::fs::read(data("rsa_private.pem")).unwrap()).unwrap(),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || get(&m) == 200));
    // C is in its grace period: its tokens still pass.
    assert_eq!(get(&by_c()), 200);
}

/// An introspection endpoint that answers each request with `answer` of the form's `token`
/// (200, JSON).
fn introspection_idp(answer: impl Fn(&str) -> Value + Send + 'static) -> Loopback {
    Loopback::start(move |req| {
        let text = String::from_utf8_lossy(req).to_string();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let token = body
            .strip_prefix("token=")
            .and_then(|b| b.split('&').next())
            .unwrap_or("");
        Some(json_response(200, &answer(token).to_string(), ""))
    })
}

/// A gateway whose one route sends everything to `up` behind introspection at `idp`.
fn introspected_gateway(idp: SocketAddr, up: SocketAddr) -> TestGateway {
    let cfg = config(
        &[up],
        &format!(
            "[auth.introspection.idp]\nurl = \"http://{idp}/introspect\"\nclient_id = \"gw\"\nclient_secret = \"s\"\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n"
        ),
    );
    TestGateway::start(&cfg, DriverChoice::Auto)
}

/// RFC 7662 §2.2 defines `exp` as an integer; §4: an answer with `exp` must not be cached
/// beyond it. An `exp` of another form is never read as "no exp" (cached for
/// `cache_max_ttl`, accepted past expiry): another number is compared as a number (rounded
/// down) and the answer is not cached; a string or any non-number makes the answer one the
/// gateway cannot judge (503, as for a malformed answer).
#[test]
fn introspection_exp_that_is_not_an_integer_is_not_ignored_rfc7662_4() {
    let t = now();
    let idp = introspection_idp(move |token| {
        let exp = match token {
            "int-future" => json!(t + 600),
            "float-future" => json!(t as f64 + 600.5),
            "float-past" => json!(t as f64 - 100.5),
            "float-just-past" => json!(t as f64 - 1.5),
            "negative" => json!(-5),
            "string-future" => json!((t + 600).to_string()),
            "string-past" => json!((t - 100).to_string()),
            "bool" => json!(true),
            _ => json!(null),
        };
        json!({"active": true, "sub": "bob", "exp": exp})
    });
    let up = Upstream::echo();
    let gw = introspected_gateway(idp.addr, up.addr);
    let get = |t: &str| get_with(gw.addr, "/", &bearer(t));
    let calls = |token: &str| {
        let before = idp.hits();
        for _ in 0..3 {
            let r = get(token);
            assert_eq!(r.status, 200, "{token}: {}", r.text());
        }
        idp.hits() - before
    };
    assert_eq!(calls("int-future"), 1, "an integer exp: cached");
    assert_eq!(calls("float-future"), 3, "a fractional exp: not cached");
    for token in ["float-past", "float-just-past", "negative"] {
        let r = get(token);
        assert_eq!(r.status, 401, "{token}: {}", r.text());
        assert_eq!(r.json()["message"], "the token has expired", "{token}");
    }
    for token in ["string-future", "string-past", "bool"] {
        assert_eq!(get(token).status, 503, "{token}");
    }
    assert_eq!(up.hits(), 6);
}

/// RFC 7662 §2.2: `nbf` and `iat` are integers. An active answer whose `nbf` is ahead of
/// the gateway's clock (beyond 30 s of skew) is refused as not valid yet, and not remembered;
/// an `nbf` or `iat` that is not a number makes an answer the gateway cannot judge (503).
#[test]
fn introspection_nbf_is_honoured_and_nbf_iat_must_be_numbers_rfc7662_2_2() {
    let t = now();
    let idp = introspection_idp(move |token| {
        let mut answer = json!({"active": true, "sub": "bob", "exp": t + 600});
        let (k, v) = match token {
            "nbf-past" => ("nbf", json!(t - 100)),
            "nbf-skew" => ("nbf", json!(t + 10)),
            "nbf-future" => ("nbf", json!(t + 600)),
            "nbf-float-future" => ("nbf", json!(t as f64 + 600.5)),
            "nbf-string" => ("nbf", json!((t - 100).to_string())),
            "iat-number" => ("iat", json!(t - 5)),
            "iat-string" => ("iat", json!((t - 5).to_string())),
            "iat-bool" => ("iat", json!(true)),
            _ => ("nbf", json!(null)),
        };
        answer[k] = v;
        answer
    });
    let up = Upstream::echo();
    let gw = introspected_gateway(idp.addr, up.addr);
    let get = |t: &str| get_with(gw.addr, "/", &bearer(t));
    for token in ["nbf-past", "nbf-skew", "nbf-null", "iat-number"] {
        let r = get(token);
        assert_eq!(r.status, 200, "{token}: {}", r.text());
    }
    for token in ["nbf-future", "nbf-float-future"] {
        let before = idp.hits();
        for _ in 0..2 {
            let r = get(token);
            assert_eq!(r.status, 401, "{token}: {}", r.text());
            assert_eq!(r.json()["message"], "the token is not valid yet", "{token}");
        }
        assert_eq!(
            idp.hits() - before,
            2,
            "{token}: not remembered, asked again"
        );
    }
    for token in ["nbf-string", "iat-string", "iat-bool"] {
        assert_eq!(get(token).status, 503, "{token}");
    }
    assert_eq!(up.hits(), 4);
}

/// A route limited to GET serves HEAD too (RFC 9110 §9.3.2: HEAD is GET without content, and an
/// origin runs GET's handler for it), so a HEAD cannot pass by a GET route's auth to a later
/// route without one; other methods still go on to the next route.
#[test]
fn a_head_request_takes_the_get_route_and_its_auth_rfc9110_9_3_2() {
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[[consumers]]\nname = \"ops\"\napi_keys = [\"{}\"]\n\n[[routes]]\npath_prefix = \"/admin\"\nmethods = [\"GET\"]\nupstream = \"up\"\nauth = \"api_key\"\n\n[[routes]]\nupstream = \"up\"\n",
            key_hash_hex(b"ops-key")
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let send = |method: &str, key: &str| {
        request(
            gw.addr,
            format!("{method} /admin/users HTTP/1.1\r\nHost: test.local\r\n{key}Content-Length: 0\r\n\r\n")
                .as_bytes(),
        )
    };
    assert_eq!(send("GET", "").status, 401);
    assert_eq!(send("HEAD", "").status, 401, "HEAD takes the GET route");
    assert_eq!(send("HEAD", "X-Api-Key: ops-key\r\n").status, 200);
    assert_eq!(up.last().method, "HEAD");
    assert_eq!(up.hits(), 1);
    // Another method is not GET's: the next route takes it.
    assert_eq!(send("POST", "").status, 200);
    assert_eq!(up.hits(), 2);
}

/// A forwarded claim holds text the token's issuer (or its user: a name, an email) chose; it
/// may not fill a header that says who the caller is by other means: the consumer header,
/// the API key header, Authorization, an mTLS subject header.
#[test]
fn forward_claims_cannot_target_identity_headers() {
    let bad = |extra: &str| {
        ringway::config::Config::parse(
            &config(&["127.0.0.1:9".parse().unwrap()], extra),
            "auth.toml",
        )
        .unwrap_err()
    };
    let jwt = "[auth.jwt.j]\nsecret = \"0123456789abcdef0123456789abcdef\"\n";
    let intro = "[auth.introspection.i]\nurl = \"http://127.0.0.1:9/i\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
    for (extra, key, what) in [
        (
            format!("{jwt}forward_claims = {{ name = \"x-consumer\" }}\n"),
            "auth.jwt.j.forward_claims",
            "auth.consumer_header",
        ),
        (
            format!("[auth]\nconsumer_header = \"x-client\"\n{jwt}forward_claims = {{ sub = \"X-Client\" }}\n"),
            "auth.jwt.j.forward_claims",
            "auth.consumer_header",
        ),
        (
            format!("{intro}forward_claims = {{ sub = \"x-api-key\" }}\n"),
            "auth.introspection.i.forward_claims",
            "auth.api_key.header",
        ),
        (
            format!("[auth.api_key]\nheader = \"x-key\"\n{jwt}forward_claims = {{ k = \"x-key\" }}\n"),
            "auth.jwt.j.forward_claims",
            "auth.api_key.header",
        ),
        (
            format!("{intro}forward_claims = {{ sub = \"authorization\" }}\n"),
            "auth.introspection.i.forward_claims",
            "credential",
        ),
    ] {
        let e = bad(&extra);
        assert_eq!(e.key, key, "{extra}: {e}");
        assert!(e.reason.contains(what), "{extra}: {e}");
    }
    // Other names stay accepted.
    ringway::config::Config::parse(
        &config(
            &["127.0.0.1:9".parse().unwrap()],
            &format!("{jwt}forward_claims = {{ name = \"x-user-name\" }}\n"),
        ),
        "auth.toml",
    )
    .unwrap();
}

/// With `allow_underscores_in_headers`, a client's header spelled with `_` for `-` reaches the
/// upstream, and CGI/WSGI/Rack/PHP-FPM read `x_consumer` and `x-consumer` as the same
/// `HTTP_X_CONSUMER` (RFC 3875 §4.1.18: `-` becomes `_`). Client copies of identity headers are removed under every such
/// spelling, on auth routes and open ones; other underscore headers pass.
#[test]
fn underscore_spellings_of_identity_headers_are_removed() {
    let up = Upstream::echo();
    let cfg = gateway_config(up.addr).replacen(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\nallow_underscores_in_headers = true\n",
        1,
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let bob = with(alice(), "sub", json!("bob"));
    let spoof = "X_Consumer: admin\r\nx_user_id: admin\r\nx-user_id: admin\r\nx_tenant: t9\r\nx_other: kept\r\n";
    for (path, auth) in [("/jwt", bearer(&hs(&bob))), ("/open", String::new())] {
        let r = get_with(gw.addr, path, &format!("{auth}{spoof}"));
        assert_eq!(r.status, 200, "{path}");
        let seen = up.last();
        let names: Vec<String> = seen
            .headers
            .iter()
            .map(|(k, _)| k.to_ascii_lowercase())
            .collect();
        for gone in [
            "x_consumer",
            "x_user_id",
            "x-user_id",
            "x_tenant",
            "x-consumer",
        ] {
            assert!(
                !names.iter().any(|n| n == gone),
                "{path}: {gone} in {names:?}"
            );
        }
        assert_eq!(seen.header("x_other"), Some("kept"), "{path}");
        let want = if path == "/jwt" { vec!["bob"] } else { vec![] };
        assert_eq!(seen.headers_named("x-user-id"), want, "{path}");
    }
}

/// A subject is unique only within its issuer (RFC 7519 §4.1.2; RFC 8725 §3.8): with two
/// token providers, the same `sub` at each is two callers. A consumer's subjects are tied to
/// the provider they were listed for, so a partner's "alice" is not the internal consumer
/// alice (nor counted as it, nor given its scopes); a bare subject array beside several
/// providers is refused at load, naming the key; with one provider it keeps working.
#[test]
fn consumer_subjects_belong_to_one_provider_rfc7519_4_1_2() {
    const PARTNER: &str = "partner-secret-of-32-bytes-minimum";
    let up = Upstream::echo();
    let providers = format!(
        "[auth.jwt.internal]\nsecret = \"{SECRET}\"\n\n[auth.jwt.partner]\nsecret = \"{PARTNER}\"\n\n"
    );
    let toml = config(
        &[up.addr],
        &format!(
            r#"{providers}
[[consumers]]
name = "alice-app"
jwt_subjects = {{ internal = ["alice"] }}

[[consumers]]
name = "partner-co"
jwt_subjects = {{ partner = ["p-1", "alice-partner"] }}

[[routes]]
path_prefix = "/any"
upstream = "up"
auth = {{ any_of = ["partner", "internal"] }}
"#
        ),
    );
    let partner = |claims: &Value| {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(PARTNER.as_bytes()),
        )
        .unwrap()
    };
    let claims = |sub: &str| json!({"sub": sub, "exp": now() + 600});
    for d in DRIVERS {
        let gw = TestGateway::start(&toml, d);
        let consumer = |token: &str| {
            let r = get_with(gw.addr, "/any", &bearer(token));
            assert_eq!(r.status, 200, "{d:?}: {}", r.text());
            up.last()
                .headers_named("x-consumer")
                .into_iter()
                .map(String::from)
                .collect::<Vec<String>>()
        };
        // The partner's "alice" is a valid partner token, but no consumer.
        assert_eq!(consumer(&partner(&claims("alice"))), Vec::<String>::new());
        assert_eq!(consumer(&hs(&claims("alice"))), vec!["alice-app"]);
        assert_eq!(consumer(&partner(&claims("p-1"))), vec!["partner-co"]);
        // ... and the partner's subjects are not the internal provider's.
        assert_eq!(consumer(&hs(&claims("p-1"))), Vec::<String>::new());
    }

    let parse =
        |extra: &str| ringway::config::Config::parse(&config(&[up.addr], extra), "auth.toml");
    // A bare array beside two providers (here a JWT and an introspection one) is refused.
    let two = format!(
        "[auth.jwt.internal]\nsecret = \"{SECRET}\"\n\n[auth.introspection.oauth]\nurl = \"http://127.0.0.1:9/i\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\n"
    );
    let e = parse(&format!(
        "{two}[[consumers]]\nname = \"c\"\njwt_subjects = [\"alice\"]\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "consumers[0].jwt_subjects", "{e}");
    assert!(e.reason.contains("several token providers"), "{e}");
    assert!(e.reason.contains("carry each subject, e.g."), "{e}");
    assert!(e.reason.contains("\"internal\", \"oauth\""), "{e}");
    assert!(e.line.is_some(), "{e}");
    // A provider that does not exist.
    let e = parse(&format!(
        "{providers}[[consumers]]\nname = \"c\"\njwt_subjects = {{ oauth = [\"alice\"] }}\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "consumers[0].jwt_subjects.oauth", "{e}");
    assert!(e.reason.contains("no JWT or introspection provider"), "{e}");
    // The same subject of the same provider for two consumers; of two providers, fine.
    let e = parse(&format!(
        "{providers}[[consumers]]\nname = \"a\"\njwt_subjects = {{ internal = [\"x\"] }}\n[[consumers]]\nname = \"b\"\njwt_subjects = {{ partner = [\"x\"], internal = [\"y\", \"x\"] }}\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "consumers[1].jwt_subjects.internal[1]", "{e}");
    assert!(e.reason.contains("already belongs"), "{e}");
    // One provider: a bare array is its subjects, as before; an introspection provider's
    // subjects are written the same way.
    parse(&format!(
        "[auth.jwt.internal]\nsecret = \"{SECRET}\"\n[[consumers]]\nname = \"c\"\njwt_subjects = [\"alice\"]\n"
    ))
    .expect("one provider: bare subjects are its own");
    parse(&format!(
        "{two}[[consumers]]\nname = \"c\"\njwt_subjects = {{ oauth = [\"alice\"], internal = [\"alice\"] }}\n"
    ))
    .expect("subjects per provider");
}

/// An HS256 token (signed with `SECRET`) whose JOSE header is `header`, as written.
fn hs_with_header(header: &Value, claims: &Value) -> String {
    let msg = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        msg.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{msg}.{sig}")
}

/// RFC 8725 §3.11 and RFC 9068 §4: a provider may require the header `typ` (here `at+jwt`),
/// so that another JWT of the same issuer and keys (an ID token, `typ: JWT`) is no access
/// token. Compared as a media type, case-insensitively, with or without `application/`
/// (RFC 7515 §4.1.9); a token without `typ` or with another is 401 invalid_token. A provider
/// without `typ` takes any.
#[test]
fn a_provider_can_require_the_token_type_rfc8725_3_11() {
    let up = Upstream::echo();
    let toml = config(
        &[up.addr],
        &format!(
            r#"
[auth.jwt.at]
secret = "{SECRET}"
typ = "at+jwt"

[auth.jwt.any]
secret = "{SECRET}"

[[routes]]
path_prefix = "/at"
upstream = "up"
auth = "at"

[[routes]]
path_prefix = "/any"
upstream = "up"
auth = "any"
"#
        ),
    );
    let claims = json!({"sub": "alice", "exp": now() + 600});
    let token = |typ: Value| {
        let mut h = json!({"alg": "HS256"});
        if !typ.is_null() {
            h["typ"] = typ;
        }
        hs_with_header(&h, &claims)
    };
    for d in DRIVERS {
        let gw = TestGateway::start(&toml, d);
        for typ in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "Application/At+JWT",
        ] {
            let r = get_with(gw.addr, "/at", &bearer(&token(json!(typ))));
            assert_eq!(r.status, 200, "{d:?} typ {typ}: {}", r.text());
        }
        let refused = [
            json!(null),
            json!("JWT"),
            json!("jwt"),
            json!("application/jwt"),
            json!("at+jwt "),
            json!("text/at+jwt"),
            json!("application/application/at+jwt"),
            json!("at"),
            json!(""),
            json!(["at+jwt"]),
            json!(1),
        ];
        for typ in &refused {
            let r = get_with(gw.addr, "/at", &bearer(&token(typ.clone())));
            assert_eq!(r.status, 401, "{d:?} typ {typ}: {}", r.text());
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"ringway\", error=\"invalid_token\""),
                "{d:?} typ {typ}"
            );
        }
        // No requirement: any type, or none.
        for typ in [json!(null), json!("JWT"), json!("at+jwt")] {
            let r = get_with(gw.addr, "/any", &bearer(&token(typ.clone())));
            assert_eq!(r.status, 200, "{d:?} typ {typ}: {}", r.text());
        }
    }
    for bad in ["", "at+jwt; charset=x", "a/b/c", "at jwt", "/jwt"] {
        let e = ringway::config::Config::parse(
            &config(
                &[up.addr],
                &format!("[auth.jwt.a]\nsecret = \"{SECRET}\"\ntyp = {bad:?}\n"),
            ),
            "auth.toml",
        )
        .unwrap_err();
        assert_eq!(e.key, "auth.jwt.a.typ", "{bad:?}: {e}");
        assert!(e.reason.contains("not a media type"), "{bad:?}: {e}");
        assert!(e.line.is_some(), "{e}");
    }
}

/// RFC 7519 §4.1.4-4.1.6: `exp`, `nbf` and `iat` are NumericDates. A token carrying one of
/// them as a string, an object, an array, a boolean, null or a negative number is invalid
/// (401 invalid_token, "malformed"), not read as if the claim were absent; numbers, whole or
/// not, pass, and so does a token without `iat`.
#[test]
fn time_claims_that_are_not_numeric_dates_are_invalid_rfc7519_4_1_6() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&gateway_config(up.addr), DriverChoice::Auto);
    let t = now();
    let not_dates = [
        json!("x"),
        json!(t.to_string()),
        json!({}),
        json!({"t": t}),
        json!([t]),
        json!(true),
        json!(null),
        json!(-1),
    ];
    for claim in ["iat", "nbf", "exp"] {
        for v in &not_dates {
            let token = hs(&with(alice(), claim, v.clone()));
            let r = get_with(gw.addr, "/jwt", &bearer(&token));
            assert_eq!(r.status, 401, "{claim} = {v}: {}", r.text());
            assert_eq!(r.json()["error"], "invalid_token", "{claim} = {v}");
            assert!(
                r.text().contains("malformed"),
                "{claim} = {v}: {}",
                r.text()
            );
        }
    }
    assert_eq!(up.hits(), 0);
    for iat in [json!(t), json!(t as f64 + 0.5), json!(0), json!(t + 5)] {
        let r = get_with(
            gw.addr,
            "/jwt",
            &bearer(&hs(&with(alice(), "iat", iat.clone()))),
        );
        assert_eq!(r.status, 200, "iat = {iat}: {}", r.text());
    }
    let r = get_with(gw.addr, "/jwt", &bearer(&hs(&alice())));
    assert_eq!(r.status, 200, "without iat: {}", r.text());
}

/// An RSA JWK whose `n` and `e` carry a zero octet in front (RFC 7518 §6.3.1.1 notes the
/// libraries that write them so): the same numbers, so the same key.
fn jwk_with_leading_zeros(file: &str, kid: &str) -> Value {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut k = jwk_with_kid(file, Some(kid));
    for p in ["n", "e"] {
        let mut v = vec![0u8];
        v.extend(b64.decode(k[p].as_str().unwrap()).unwrap());
        k[p] = json!(b64url(&v));
    }
    k
}

/// RSA keys (RFC 7518 §3.3, §3.5, §6.3.1.1). A key of fewer than 2048 bits can verify
/// nothing (RS* and PS* require 2048, and ring refuses shorter keys): in a
/// `public_key_file` or a `jwks_file` it fails the load with the file and the reason, as a
/// short secret does, rather than loading a provider whose every token is 401; in a fetched
/// set it is skipped and the other keys serve. An `n` or `e` with a leading zero octet is
/// read as the unsigned number it is: before, ring refused it and every token of that key
/// was 401, from a file or a URL.
#[test]
fn rsa_keys_rfc7518_3_3_short_moduli_refused_and_leading_zero_octets_read() {
    let dir = std::env::temp_dir().join(format!("ringway-rsa-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    let provider = |key: &str| {
        config(
            &["127.0.0.1:9".parse().unwrap()],
            &format!(
                "[auth.jwt.f]\n{key}\n[[routes]]\npath = \"/f\"\nupstream = \"up\"\nauth = \"f\"\n"
            ),
        )
    };
    std::fs::write(
        &file,
        json!({"keys": [jwk_with_kid("rsa_jwk.json", Some("rsa")), jwk_with_kid("rsa1024_jwk.json", Some("weak"))]})
            .to_string(),
    )
    .unwrap();
    let e = ringway::config::Config::parse(
        &provider(&format!("jwks_file = \"{}\"", file.display())),
        "t.toml",
    )
    .unwrap_err();
    assert_eq!(e.key, "auth.jwt.f.jwks_file", "{e}");
    assert!(
        e.reason.contains("kid \"weak\"")
            && e.reason.contains("1024 bits")
            && e.reason.contains("RFC 7518 §3.3"),
        "{e}"
    );
    let e = ringway::config::Config::parse(
        &provider(&format!(
            "public_key_file = \"{}\"\nalgorithm = \"RS256\"",
            data("rsa1024_public.pem")
        )),
        "t.toml",
    )
    .unwrap_err();
    assert_eq!(e.key, "auth.jwt.f.public_key_file", "{e}");
    assert!(e.reason.contains("1024 bits"), "{e}");

    // A jwks_file whose key has leading zero octets: its tokens verify.
    let up = Upstream::echo();
    std::fs::write(
        &file,
        json!({"keys": [jwk_with_leading_zeros("rsa2_jwk.json", "lz")]}).to_string(),
    )
    .unwrap();
    let gw = TestGateway::start(
        &config(
            &[up.addr],
            &format!(
                "[auth.jwt.f]\njwks_file = \"{}\"\n[[routes]]\nupstream = \"up\"\nauth = \"f\"\n",
                file.display()
            ),
        ),
        DriverChoice::Auto,
    );
    let lz = rs(&alice(), "rsa2_private.pem", "lz");
    let r = get_with(gw.addr, "/", &bearer(&lz));
    assert_eq!(r.status, 200, "jwks_file: {}", r.text());
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);

    // A fetched set: a plain key, the same with zeros in front, a 1024-bit one.
    let set = json!({"keys": [
        jwk_with_kid("rsa_jwk.json", Some("rsa")),
        jwk_with_leading_zeros("rsa2_jwk.json", "lz"),
        jwk_with_kid("rsa1024_jwk.json", Some("weak")),
    ]})
    .to_string();
    let (_keys, _up, gw) = served_jwks_gateway(&Arc::new(Mutex::new(set)), "");
    let rsa = rs(&alice(), "rsa_private.pem", "rsa");
    assert!(
        eventually(Duration::from_secs(10), || get_with(
            gw.addr,
            "/",
            &bearer(&rsa)
        )
        .status
            == 200),
        "the set is in service"
    );
    let r = get_with(gw.addr, "/", &bearer(&lz));
    assert_eq!(r.status, 200, "jwks_url: {}", r.text());
}

/// RFC 7518 §6.2.1.2: an EC JWK's `x` and `y` are full-size octet strings, but some signers
/// drop a coordinate's leading zero octet (a P-256 `x` of 31 octets, about one key in 128).
/// The number is the same: it is padded back and the key's tokens verify; before, the key
/// loaded as a point that never verified, and every token it signed was 401.
#[test]
fn an_ec_coordinate_without_its_leading_zero_octet_is_read_rfc7518_6_2_1_2() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut short = jwk_with_kid("ec256_short_x_jwk.json", Some("ecz"));
    let x = b64.decode(short["x"].as_str().unwrap()).unwrap();
    assert_eq!(
        (x.len(), x[0]),
        (32, 0),
        "the test key's x starts with a zero octet"
    );
    short["x"] = json!(b64url(&x[1..]));
    let set = json!({"keys": [jwk_with_kid("rsa_jwk.json", Some("rsa")), short]}).to_string();
    let (_keys, _up, gw) = served_jwks_gateway(&Arc::new(Mutex::new(set)), "");
    let rsa = rs(&alice(), "rsa_private.pem", "rsa");
    assert!(
        eventually(Duration::from_secs(10), || get_with(
            gw.addr,
            "/",
            &bearer(&rsa)
        )
        .status
            == 200),
        "the set is in service"
    );
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ecz".into());
    let key = EncodingKey::from_ec_pem(&std::fs::read(data("ec256_short_x_private.pem")).unwrap())
        .unwrap();
    let t = encode(&h, &alice(), &key).unwrap();
    let r = get_with(gw.addr, "/", &bearer(&t));
    assert_eq!(r.status, 200, "{}", r.text());
}
