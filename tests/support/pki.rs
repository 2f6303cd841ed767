//! Certificates for TLS tests, made with rcgen once per test binary: two CAs ("ca" and
//! "other-ca") and leaves signed by them, written as PEM files under the target's tmp dir.
//!
//! | file stem | names | issuer | use |
//! |---|---|---|---|
//! | `a`, `wild` (+ `-chain`) | a.test, *.wild.test | ca | listener certificates |
//! | `up` / `up-other` | up.test | ca / other-ca | TLS upstreams |
//! | `client` / `stranger` | — | ca / other-ca | client certificates |
//! | `loopback` / `loopback-other` | 127.0.0.1 (IP SAN) | ca / other-ca | https servers the gateway calls by address (JWKS, introspection) |

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{RootCertStore, ServerConfig};

pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).expect("fixture written")
    }
}

fn issue(
    dir: &Path,
    name: &str,
    sans: &[&str],
    cn: &str,
    eku: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Ringway Tests");
    p.extended_key_usages = vec![eku];
    let cert = p.signed_by(&key, issuer).expect("signed");
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

fn make_ca(dir: &Path, name: &str) -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let cert = p.self_signed(&key).expect("self-signed");
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    Issuer::new(p, key)
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        // Under target/tmp, one directory per test binary (two binaries may run at once), made
        // afresh by each run.
        let bin = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tests".into());
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pki-{bin}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = make_ca(&dir, "ca");
        let other = make_ca(&dir, "other-ca");
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        issue(&dir, "a", &["a.test"], "a.test", server.clone(), &ca);
        issue(&dir, "wild", &["*.wild.test"], "wild", server.clone(), &ca);
        issue(&dir, "up", &["up.test"], "up.test", server.clone(), &ca);
        issue(&dir, "client", &[], "client one", client.clone(), &ca);
        issue(&dir, "stranger", &[], "stranger", client, &other);
        issue(
            &dir,
            "up-other",
            &["up.test"],
            "up.test",
            server.clone(),
            &other,
        );
        let lo = "127.0.0.1";
        issue(&dir, "loopback", &[lo], lo, server.clone(), &ca);
        issue(&dir, "loopback-other", &[lo], lo, server, &other);
        // The chain files the gateway is given: leaf then CA.
        for n in ["a", "wild"] {
            let mut chain = std::fs::read(dir.join(format!("{n}.pem"))).unwrap();
            chain.extend(std::fs::read(dir.join("ca.pem")).unwrap());
            std::fs::write(dir.join(format!("{n}-chain.pem")), chain).unwrap();
        }
        Pki { dir }
    })
}

pub fn certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .expect("PEM")
}

pub fn key(pem: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem).expect("key PEM")
}

pub fn roots(name: &str) -> RootCertStore {
    let mut r = RootCertStore::empty();
    for c in certs(&pki().read(name)) {
        r.add(c).unwrap();
    }
    r
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config presenting the certificate `stem` (`"loopback"`), without client auth.
pub fn server_config(stem: &str) -> Arc<ServerConfig> {
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                certs(&pki().read(&format!("{stem}.pem"))),
                key(&pki().read(&format!("{stem}.key"))),
            )
            .unwrap(),
    )
}
