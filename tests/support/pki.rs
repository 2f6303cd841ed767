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
    /// The "ca" issuer, for client certificates a test makes ([`client_cert_with`]).
    ca: Issuer<'static, KeyPair>,
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
        Pki { dir, ca }
    })
}

/// A client certificate `stem` issued by "ca" with the subject `dn` (its RDNs in the order
/// pushed), written beside the others (a `ClientOpts::cert` stem). When `patch` is given, the
/// first occurrence of its first bytes in the certificate is replaced by its second (same
/// length) and the certificate signed again: for subjects rcgen does not write (a Latin-1
/// TeletexString).
pub fn client_cert_with(
    stem: &'static str,
    dn: rcgen::DistinguishedName,
    patch: Option<(&[u8], &[u8])>,
) {
    let p = pki();
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &p.ca).expect("signed");
    let mut der = cert.der().to_vec();
    if let Some((from, to)) = patch {
        assert_eq!(from.len(), to.len());
        der = resign(&der, from, to, &p.ca);
    }
    std::fs::write(p.dir.join(format!("{stem}.pem")), pem_of(&der)).unwrap();
    std::fs::write(p.dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

/// DER: a tag and its length octets for `len` content bytes.
fn der_head(tag: u8, len: usize, out: &mut Vec<u8>) {
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let b = len.to_be_bytes();
        let skip = b.iter().take_while(|x| **x == 0).count();
        out.push(0x80 | (b.len() - skip) as u8);
        out.extend_from_slice(&b[skip..]);
    }
}

/// Splits one DER element off `d`: (whole element, rest).
fn der_split(d: &[u8]) -> (&[u8], &[u8]) {
    let (len, hdr) = match d[1] {
        l if l < 0x80 => (l as usize, 2),
        l => {
            let n = (l & 0x7f) as usize;
            (
                d[2..2 + n].iter().fold(0usize, |a, b| a << 8 | *b as usize),
                2 + n,
            )
        }
    };
    d.split_at(hdr + len)
}

/// The certificate `der` with `from` replaced by `to` in its TBS, signed again by `ca`.
fn resign(der: &[u8], from: &[u8], to: &[u8], ca: &Issuer<'static, KeyPair>) -> Vec<u8> {
    // Inside the outer SEQUENCE: TBS, signature algorithm, signature.
    let head_len = match der[1] {
        l if l < 0x80 => 2,
        l => 2 + (l & 0x7f) as usize,
    };
    let inner = &der[head_len..];
    let (tbs, rest) = der_split(inner);
    let (alg, _) = der_split(rest);
    let mut tbs = tbs.to_vec();
    let at = tbs
        .windows(from.len())
        .position(|w| w == from)
        .expect("patched bytes present");
    tbs[at..at + from.len()].copy_from_slice(to);
    let sig = rcgen::SigningKey::sign(ca.key(), &tbs).expect("signed");
    let mut bits = Vec::new();
    der_head(0x03, sig.len() + 1, &mut bits);
    bits.push(0);
    bits.extend_from_slice(&sig);
    let mut content = tbs;
    content.extend_from_slice(alg);
    content.extend_from_slice(&bits);
    let mut out = Vec::new();
    der_head(0x30, content.len(), &mut out);
    out.extend_from_slice(&content);
    out
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
