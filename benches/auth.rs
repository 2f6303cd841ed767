//! Criterion benches for the auth stage: a JWT checked cold (signature and claims) against the
//! same token found in the worker's cache, for HS256, RS256 and ES256, and an API key lookup.
//!
//! Run: `cargo bench --bench auth`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

use ringway::auth::jwt::{self, ClaimRules};
use ringway::auth::{AuthShared, WorkerAuth};
use ringway::config::Config;

const NOW: u64 = 1_700_000_000;

fn data(name: &str) -> String {
    format!("{}/tests/data/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn claims() -> serde_json::Value {
    json!({"sub": "user-1234567890", "iss": "https://idp.example.com", "aud": "api",
           "exp": NOW + 3600, "iat": NOW, "scope": "read write orders:read",
           "tenant": "acme", "roles": ["staff"]})
}

fn bench_jwt(c: &mut Criterion) {
    let src = format!(
        r#"
[[listeners]]
address = "127.0.0.1:0"
[auth.jwt.hs]
secret = "bench-only-secret-of-at-least-32-bytes"
issuers = ["https://idp.example.com"]
audiences = ["api"]
forward_claims = {{ sub = "x-user-id", tenant = "x-tenant" }}
[auth.jwt.rs]
public_key_file = "{}"
algorithm = "RS256"
issuers = ["https://idp.example.com"]
audiences = ["api"]
[auth.jwt.es]
public_key_file = "{}"
algorithm = "ES256"
issuers = ["https://idp.example.com"]
audiences = ["api"]
"#,
        data("rsa_public.pem"),
        data("ec256_public.pem")
    );
    let cfg = Config::parse(&src, "bench.toml").unwrap();
    let shared = AuthShared::new(&cfg).unwrap();
    let auth = WorkerAuth::new(&cfg, &shared);
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(b"bench-only-secret-of-at-least-32-bytes"),
    )
    .unwrap();
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims(),
        &EncodingKey::from_rsa_pem(&std::fs::read(data("rsa_private.pem")).unwrap()).unwrap(),
    )
    .unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &EncodingKey::from_ec_pem(&std::fs::read(data("ec256_private.pem")).unwrap()).unwrap(),
    )
    .unwrap();
    // Providers in name order: es = 0, hs = 1, rs = 2.
    for (name, idx, token, key_cfg) in [
        ("HS256", 1, &hs, &cfg.auth.jwt["hs"]),
        ("RS256", 2, &rs, &cfg.auth.jwt["rs"]),
        ("ES256", 0, &es, &cfg.auth.jwt["es"]),
    ] {
        let keys = jwt::load_static(key_cfg).unwrap();
        let rules = ClaimRules::from_config(key_cfg);
        let mut g = c.benchmark_group(format!("jwt_{name}"));
        g.bench_function("cold_verify", |b| {
            b.iter(|| jwt::verify(black_box(token), &keys, &rules, NOW).unwrap())
        });
        auth.verify_jwt(idx, token, NOW).unwrap();
        g.bench_function("cached", |b| {
            b.iter(|| auth.verify_jwt(idx, black_box(token), NOW).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench_jwt);
criterion_main!(benches);
