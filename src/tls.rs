//! TLS with rustls (ring provider) on monoio: listener configs (certificates chosen by SNI,
//! versions, resumption, client certificates), the server handshake, and client configs for
//! upstream groups.
//!
//! # Certificate selection
//! Each certificate answers for the DNS names in its subjectAltName extension: exact names
//! ("api.example.com") and one-label wildcards ("*.example.com" matches "a.example.com", not
//! "example.com" nor "a.b.example.com"). An exact name wins over a wildcard; among
//! certificates claiming the same name the first listed wins. No SNI, or a name no certificate
//! claims: the first certificate.
//!
//! # The handshake
//! [`accept`] drives the server handshake itself over the raw TCP stream, feeding rustls from
//! its own buffer until the handshake is done and every byte read has been handed to rustls.
//! Only then is the connection wrapped in monoio-rustls's stream, so nothing read off the
//! socket is left behind in a buffer we drop, and the session (client certificate, SNI) can be
//! inspected first. It runs in the connection's own task, under the `client_head` timeout.
//!
//! # Cancelled I/O
//! monoio-rustls moves its buffers into each read or write; a read or write dropped before it
//! completes (a timeout, a shutdown while idle) leaves the stream without them, and the next
//! call would panic. [`Guarded`] turns that into an error instead, and tells a dropped read
//! (the write side is intact: `close_notify` can still be sent) from a dropped write.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, ServerConnection};

use crate::config::{ClientAuthMode, ListenerTlsConfig, TlsVersion, UpstreamTlsConfig};

/// ALPN protocol offered to upstreams, and preferred by listeners.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// Also accepted by listeners, after `http/1.1`: HTTP/1.0 is served, and a client that offers
/// only it must not get a fatal no_application_protocol alert (RFC 7301 §3.2). HTTP/2 joins
/// once ringway speaks it.
pub const ALPN_HTTP10: &[u8] = b"http/1.0";
/// Read size while handshaking. Small enough that application data sent right behind the
/// client's Finished always fits rustls's plaintext buffer.
const HANDSHAKE_READ: usize = 4096;
/// Longest subject passed upstream (its header value, escaped and percent-encoded). A
/// certificate whose subject is longer is refused at the handshake: a cut value could be
/// another certificate's.
pub const MAX_SUBJECT: usize = 4096;

/// A TLS setting that cannot be used: the key path (`listeners[0].tls.certificates[1].key`)
/// and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfigError {
    pub key: String,
    pub reason: String,
}

fn conf_err(key: String, reason: impl Into<String>) -> TlsConfigError {
    TlsConfigError {
        key,
        reason: reason.into(),
    }
}

/// The one crypto provider: ring (shared with jsonwebtoken; no aws-lc in the tree).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &str, key: &str) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|e| conf_err(key.to_string(), format!("cannot read {path:?}: {e}")))
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &str, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read_file(path, key)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs =
        certs.map_err(|e| conf_err(key.to_string(), format!("{path:?}: bad PEM: {e:?}")))?;
    if certs.is_empty() {
        return Err(conf_err(
            key.to_string(),
            format!("{path:?} holds no CERTIFICATE block"),
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        if x509_parser::parse_x509_certificate(c).is_err() {
            return Err(conf_err(
                key.to_string(),
                format!(
                    "{path:?}: certificate #{} is not a valid X.509 certificate",
                    i + 1
                ),
            ));
        }
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &str, key: &str) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read_file(path, key)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        conf_err(
            key.to_string(),
            match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    format!("{path:?} holds no PRIVATE KEY block")
                }
                e => format!("{path:?}: bad PEM: {e:?}"),
            },
        )
    })
}

/// A chain and its key, checked to belong together.
fn certified_key(
    cert: &str,
    key: &str,
    at: &str,
    cert_key: &str,
    key_key: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsConfigError> {
    let chain = load_certs(cert, cert_key)?;
    let der = load_key(key, key_key)?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| conf_err(key_key.to_string(), format!("{key:?}: unusable key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err(conf_err(
            key_key.to_string(),
            format!("{key:?} is not the key of the certificate in {cert:?} ({at})"),
        )),
    }
}

fn roots(path: &str, key: &str) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(path, key)? {
        store
            .add(c)
            .map_err(|e| conf_err(key.to_string(), format!("{path:?}: unusable CA: {e}")))?;
    }
    Ok(store)
}

/// The DNS names of a certificate's subjectAltName, lower case.
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Picks a listener's certificate by SNI (see the module documentation).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after "*.".
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// Builds a listener's rustls config; `at` is its key path (`listeners[0].tls`).
pub fn server_config(t: &ListenerTlsConfig, at: &str) -> Result<Arc<ServerConfig>, TlsConfigError> {
    if t.certificates.is_empty() {
        return Err(conf_err(
            format!("{at}.certificates"),
            "at least one { cert, key } pair is required",
        ));
    }
    let provider = provider();
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for (i, ck) in t.certificates.iter().enumerate() {
        let here = format!("{at}.certificates[{i}]");
        let k = certified_key(
            &ck.cert,
            &ck.key,
            &here,
            &format!("{here}.cert"),
            &format!("{here}.key"),
            &provider,
        )?;
        let names = dns_names(&k.cert[0]);
        let k = Arc::new(k);
        for n in names {
            match n.strip_prefix("*.") {
                Some(parent) => {
                    wildcard
                        .entry(parent.to_string())
                        .or_insert_with(|| k.clone());
                }
                None => {
                    exact.entry(n).or_insert_with(|| k.clone());
                }
            }
        }
        default.get_or_insert(k);
    }
    let resolver = SniResolver {
        exact,
        wildcard,
        default: default.expect("at least one certificate was loaded"),
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| conf_err(format!("{at}.min_version"), e.to_string()))?;
    let builder = match &t.client_auth {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let key = format!("{at}.client_auth.ca");
            let store = Arc::new(roots(&ca.ca, &key)?);
            let v = WebPkiClientVerifier::builder_with_provider(store, provider.clone());
            let v = match ca.mode {
                ClientAuthMode::Required => v,
                ClientAuthMode::Optional => v.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(Arc::new(SubjectBound(
                v.build()
                    .map_err(|e| conf_err(key, format!("{:?}: {e}", ca.ca)))?,
            )))
        }
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
    // In the server's order of preference (rustls picks the first one the client offers).
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec(), ALPN_HTTP10.to_vec()];
    cfg.session_storage = if t.session_cache == 0 {
        Arc::new(rustls::server::NoServerSessionStorage {})
    } else {
        ServerSessionMemoryCache::new(t.session_cache)
    };
    if t.session_tickets {
        cfg.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| conf_err(format!("{at}.session_tickets"), e.to_string()))?;
    }
    Ok(Arc::new(cfg))
}

/// How a server handshake failed (counted; logged at debug level only).
#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    /// The peer closed before the handshake finished.
    Eof,
    Tls(rustls::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "i/o: {e}"),
            HandshakeError::Eof => write!(f, "peer closed during the handshake"),
            HandshakeError::Tls(e) => write!(f, "{e}"),
        }
    }
}

/// A client connection after a successful handshake.
pub type ServerStream = Guarded<monoio_rustls::ServerTlsStream<Sock>>;

/// Writes whatever rustls wants to send.
async fn flush_tls(conn: &mut ServerConnection, io: &mut TcpStream) -> Result<(), HandshakeError> {
    while conn.wants_write() {
        let mut out = Vec::with_capacity(4096);
        conn.write_tls(&mut out).map_err(HandshakeError::Io)?;
        let (r, _) = io.write_all(out).await;
        r.map_err(HandshakeError::Io)?;
    }
    Ok(())
}

/// The WebPKI client verifier, and then a bound on the subject: a certificate whose subject
/// header value ([`cert_subject`]) would be over [`MAX_SUBJECT`] is refused (alert
/// `access_denied`), rather than its subject cut.
#[derive(Debug)]
struct SubjectBound(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for SubjectBound {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self.0.verify_client_cert(end_entity, intermediates, now)?;
        match cert_subject(end_entity) {
            Some(_) => Ok(ok),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Runs the server handshake on `io`. Returns the stream and the subject of the client's
/// verified certificate, if it sent one. The caller bounds it with a timeout.
pub async fn accept(
    cfg: Arc<ServerConfig>,
    mut io: TcpStream,
) -> Result<(ServerStream, Option<Box<[u8]>>), HandshakeError> {
    let mut conn = ServerConnection::new(cfg).map_err(HandshakeError::Tls)?;
    let mut buf = vec![0u8; HANDSHAKE_READ];
    loop {
        flush_tls(&mut conn, &mut io).await?;
        if !conn.is_handshaking() {
            break;
        }
        let (r, b) = io.read(buf).await;
        buf = b;
        let n = r.map_err(HandshakeError::Io)?;
        if n == 0 {
            return Err(HandshakeError::Eof);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match conn.read_tls(&mut rest) {
                Ok(0) => {
                    return Err(HandshakeError::Io(io::Error::other(
                        "rustls took none of the bytes read",
                    )))
                }
                Ok(_) => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
            if let Err(e) = conn.process_new_packets() {
                // Send the alert rustls prepared, then give up.
                let _ = flush_tls(&mut conn, &mut io).await;
                return Err(HandshakeError::Tls(e));
            }
        }
    }
    // (Over the bound only in a resumed session made under another config: refused too.)
    let subject = match conn.peer_certificates().and_then(|c| c.first()) {
        Some(c) => Some(cert_subject(c).ok_or(HandshakeError::Tls(
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ),
        ))?),
        None => None,
    };
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => Some("1.3"),
        Some(rustls::ProtocolVersion::TLSv1_2) => Some("1.2"),
        _ => None,
    };
    Ok((
        {
            let (sock, writing) = Sock::new(io, false);
            let mut g = Guarded::new(monoio_rustls::ServerTlsStream::new(sock, conn), writing);
            g.version = version;
            g
        },
        subject,
    ))
}

/// The subject of a certificate as an RFC 4514 string, made a valid header value: the RDNs
/// last first (§2.1), the attributes of a multi-valued RDN joined with `+` (§2.2), known
/// attribute types by their short names and others by their dotted OID with the value as `#`
/// and the hex of its DER encoding (§2.3, §2.4), values escaped per §2.4 (`,` `+` `"` `\`
/// `<` `>` `;`, a leading `#`; a leading or trailing space as `\20`, NUL as `\00`). The RFC 4514 string
/// is UTF-8; each of its bytes outside printable ASCII, and `%`, is then percent-encoded.
/// Strings of every type are decoded (TeletexString as Latin-1, BMPString as UTF-16BE,
/// UniversalString as UTF-32BE); a value that does not decode is `#` and hex. `None` when the
/// result is over [`MAX_SUBJECT`] bytes: never cut, since a prefix may be another's subject.
pub fn cert_subject(der: &CertificateDer<'_>) -> Option<Box<[u8]>> {
    let mut out = Vec::new();
    if let Ok((_, x)) = x509_parser::parse_x509_certificate(der) {
        write_rfc4514(x.subject(), &mut out);
    }
    (out.len() <= MAX_SUBJECT).then(|| out.into_boxed_slice())
}

/// Writes `name` as [`cert_subject`] describes.
fn write_rfc4514(name: &x509_parser::x509::X509Name<'_>, out: &mut Vec<u8>) {
    out.reserve(name.as_raw().len());
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push(b'+');
            }
            write_attribute(atv, out);
        }
    }
}

/// Short names of RFC 4514 §3, by the content bytes of their OIDs.
const SHORT_NAMES: &[(&[u8], &str)] = &[
    (&[0x55, 0x04, 0x03], "CN"),
    (&[0x55, 0x04, 0x07], "L"),
    (&[0x55, 0x04, 0x08], "ST"),
    (&[0x55, 0x04, 0x0a], "O"),
    (&[0x55, 0x04, 0x0b], "OU"),
    (&[0x55, 0x04, 0x06], "C"),
    (&[0x55, 0x04, 0x09], "STREET"),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
        "DC",
    ),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
        "UID",
    ),
];

/// One `type=value` of an RDN.
fn write_attribute(atv: &x509_parser::x509::AttributeTypeAndValue<'_>, out: &mut Vec<u8>) {
    let oid = atv.attr_type();
    let short = SHORT_NAMES
        .iter()
        .find(|(b, _)| *b == oid.as_bytes())
        .map(|(_, n)| *n);
    let value = atv.attr_value();
    match short {
        Some(n) => out.extend_from_slice(n.as_bytes()),
        None => {
            // §2.3: the dotted-decimal form; §2.4: its value as `#` and hex.
            out.extend_from_slice(oid.to_id_string().as_bytes());
            out.push(b'=');
            write_hex_der(value, out);
            return;
        }
    }
    out.push(b'=');
    // Undecodable: the whole value as `#` and hex (§2.4).
    let Some(text) = decode_string(value) else {
        write_hex_der(value, out);
        return;
    };
    let n = text.chars().count();
    for (i, c) in text.chars().enumerate() {
        if c == '\0' {
            out.extend_from_slice(b"\\00");
            continue;
        }
        // A space at either end as a hex pair (§2.4 allows either form): a header value's
        // own leading and trailing whitespace is not part of it (RFC 9110 §5.5), so `\ `
        // at the end would lose its space on the way.
        if c == ' ' && (i == 0 || i + 1 == n) {
            out.extend_from_slice(b"\\20");
            continue;
        }
        let escape = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') || (i == 0 && c == '#');
        if escape {
            out.push(b'\\');
        }
        let mut utf8 = [0u8; 4];
        for b in c.encode_utf8(&mut utf8).bytes() {
            put_header_byte(b, out);
        }
    }
}

/// The text of a string value; `None` when it is not a string type decoded here or is not
/// valid in its type's encoding.
fn decode_string<'a>(v: &x509_parser::asn1_rs::Any<'a>) -> Option<std::borrow::Cow<'a, str>> {
    use x509_parser::asn1_rs::Tag;
    if !v.header.is_universal() || v.header.is_constructed() {
        return None;
    }
    match v.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => std::str::from_utf8(v.data).ok().map(Into::into),
        // T.61 as Latin-1, as issuers that use it mean it (and as OpenSSL reads it).
        Tag::TeletexString => Some(v.data.iter().map(|b| char::from(*b)).collect()),
        Tag::BmpString if v.data.len().is_multiple_of(2) => {
            let units = v
                .data
                .chunks_exact(2)
                .map(|u| u16::from_be_bytes([u[0], u[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
                .map(Into::into)
        }
        Tag::UniversalString if v.data.len().is_multiple_of(4) => v
            .data
            .chunks_exact(4)
            .map(|u| char::from_u32(u32::from_be_bytes([u[0], u[1], u[2], u[3]])))
            .collect::<Option<String>>()
            .map(Into::into),
        _ => None,
    }
}

/// `#` and the hex of the value's DER encoding (RFC 4514 §2.4).
fn write_hex_der(v: &x509_parser::asn1_rs::Any<'_>, out: &mut Vec<u8>) {
    out.push(b'#');
    let hex = |b: u8, out: &mut Vec<u8>| {
        let d = b"0123456789ABCDEF";
        out.extend_from_slice(&[d[(b >> 4) as usize], d[(b & 15) as usize]]);
    };
    // Identifier octets: as read when kept, else the one-octet form.
    match v.header.raw_tag() {
        Some(t) => t.iter().for_each(|b| hex(*b, out)),
        None => {
            let class = (v.header.class() as u8) << 6;
            let cons = if v.header.is_constructed() { 0x20 } else { 0 };
            hex(class | cons | (v.tag().0 as u8 & 0x1f), out);
        }
    }
    // Length octets, definite form.
    let len = v.data.len();
    if len < 0x80 {
        hex(len as u8, out);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        hex(0x80 | (bytes.len() - skip) as u8, out);
        bytes[skip..].iter().for_each(|b| hex(*b, out));
    }
    v.data.iter().for_each(|b| hex(*b, out));
}

/// A byte of the RFC 4514 string as it goes in the header: printable ASCII other than `%` as
/// it is, every other byte percent-encoded.
fn put_header_byte(b: u8, out: &mut Vec<u8>) {
    if (0x20..0x7f).contains(&b) && b != b'%' {
        out.push(b);
    } else {
        let hex = b"0123456789ABCDEF";
        out.extend_from_slice(&[b'%', hex[(b >> 4) as usize], hex[(b & 15) as usize]]);
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream side.

/// An upstream group's TLS: the connector and the name each endpoint is verified against.
pub struct UpstreamTls {
    pub connector: monoio_rustls::TlsConnector,
    /// Per endpoint, in the group's order.
    pub names: Vec<ServerName<'static>>,
}

/// A TLS connection to an upstream.
pub type ClientStream = Guarded<monoio_rustls::ClientTlsStream<Sock>>;

/// Accepts any server certificate (`verify = false`), still checking the handshake
/// signatures so that the connection is at least consistent.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds an upstream group's rustls client config; `at` is its key path
/// (`upstreams.NAME.tls`).
pub fn client_config(t: &UpstreamTlsConfig, at: &str) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| conf_err(at.to_string(), e.to_string()))?;
    let builder = if !t.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider.clone())))
    } else {
        builder.with_root_certificates(verify_roots(t.ca.as_deref(), &format!("{at}.ca"))?)
    };
    let mut cfg = match (&t.client_cert, &t.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let ck = certified_key(
                cert,
                key,
                at,
                &format!("{at}.client_cert"),
                &format!("{at}.client_key"),
                &provider,
            )?;
            let der = load_key(key, &format!("{at}.client_key"))?;
            builder
                .with_client_auth_cert(ck.cert.clone(), der)
                .map_err(|e| conf_err(format!("{at}.client_key"), e.to_string()))?
        }
        (Some(_), None) => {
            return Err(conf_err(
                format!("{at}.client_key"),
                "client_cert needs client_key",
            ))
        }
        (None, Some(_)) => {
            return Err(conf_err(
                format!("{at}.client_cert"),
                "client_key needs client_cert",
            ))
        }
    };
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    if let Some(sni) = &t.sni {
        ServerName::try_from(sni.clone())
            .map_err(|_| conf_err(format!("{at}.sni"), format!("{sni:?} is not a DNS name")))?;
    }
    Ok(Arc::new(cfg))
}

/// The trust anchors of a verifying client: the CA bundle at `ca` (key path `key`), else the
/// webpki roots (Mozilla's list, compiled in).
fn verify_roots(ca: Option<&str>, key: &str) -> Result<RootCertStore, TlsConfigError> {
    match ca {
        Some(path) => roots(path, key),
        None => Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
    }
}

/// The client config of the gateway's own https calls (JWKS URLs, token introspection):
/// server certificates verified against `ca` (key path `key`) or the webpki roots, no client
/// certificate, HTTP/1.1. Built once per provider and shared by every call, so sessions are
/// resumed across calls.
pub fn https_client_config(
    ca: Option<&str>,
    key: &str,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| conf_err(key.to_string(), e.to_string()))?
        .with_root_certificates(verify_roots(ca, key)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// The name an endpoint's certificate is checked against: `sni`, else the host of the
/// endpoint's configured address ("localhost:9443" → "localhost", "127.0.0.1:9443" → the IP).
pub fn endpoint_name(sni: Option<&str>, authority: &str) -> Option<ServerName<'static>> {
    let host = match sni {
        Some(s) => s,
        None => match authority.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => authority,
        },
    };
    ServerName::try_from(host.to_string()).ok()
}

/// Builds an upstream group's TLS from its config (already validated).
pub fn upstream_tls(
    t: &UpstreamTlsConfig,
    at: &str,
    authorities: &[&str],
) -> Result<UpstreamTls, TlsConfigError> {
    let cfg = client_config(t, at)?;
    let mut names = Vec::with_capacity(authorities.len());
    for a in authorities {
        names.push(endpoint_name(t.sni.as_deref(), a).ok_or_else(|| {
            conf_err(
                format!("{at}.sni"),
                format!("no TLS server name can be taken from {a:?}; set sni"),
            )
        })?);
    }
    Ok(UpstreamTls {
        connector: monoio_rustls::TlsConnector::from(cfg),
        names,
    })
}

/// TLS handshake with an upstream endpoint over a connected stream.
pub async fn connect(
    tls: &UpstreamTls,
    ep: usize,
    io: TcpStream,
) -> Result<ClientStream, monoio_rustls::TlsError> {
    let (sock, writing) = Sock::new(io, true);
    let s = tls.connector.connect(tls.names[ep].clone(), sock).await?;
    Ok(Guarded::new(s, writing))
}

// ---------------------------------------------------------------------------------------------
// Cancellation guard.

/// What the TCP stream under a TLS session shares with its [`Guarded`] wrapper.
#[derive(Default)]
pub struct SockFlags {
    /// A socket write is under way. A write dropped before it completed leaves it set:
    /// monoio-rustls's write buffer went with it.
    writing: Cell<bool>,
    /// Reads return `WouldBlock` without touching the socket: [`Guarded::buffered_input`]
    /// looks at what the TLS layer already holds.
    probing: Cell<bool>,
    /// Writes are one non-blocking `send` each, done before the write returns, and what finds
    /// no room in the socket buffer is kept in `tail`: [`Guarded::close_notify_now`] writes its
    /// alert without waiting and without leaving an operation in flight on a socket about to
    /// be closed.
    closing: Cell<bool>,
    /// While closing: the bytes the socket had no room for, in order (at most
    /// [`CLOSE_TAIL_MAX`]); a task of their own sends them (see [`LateCloses`]).
    tail: Cell<Vec<u8>>,
    /// Where the bytes read off the socket stand in TLS record framing; kept only for
    /// upstream connections (see [`RecordScan`]).
    scan: Cell<Option<RecordScan>>,
}

/// Follows the TLS record framing of the bytes read off a socket from its first byte (RFC
/// 8446 §5.1, RFC 5246 §6.2: a 5-byte header whose last two bytes are the length of the
/// fragment that follows). It tells whether the stream read so far ends inside a record:
/// rustls then holds a partial record it cannot decrypt yet, and no public call of rustls, nor
/// a peek at the socket, shows it.
#[derive(Clone, Copy, Default)]
struct RecordScan {
    /// Header bytes seen of the record being framed (0 to 4).
    header: u8,
    /// The high byte of its length, once seen.
    len_hi: u8,
    /// Fragment bytes still to come; `usize::MAX` once the scan lost step (never a boundary
    /// again).
    left: usize,
}

impl RecordScan {
    const HEADER: u8 = 5;

    fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.left > 0 {
                let k = self.left.min(b.len());
                if self.left != usize::MAX {
                    self.left -= k;
                }
                b = &b[k..];
                continue;
            }
            self.header += 1;
            match self.header {
                4 => self.len_hi = b[0],
                Self::HEADER => {
                    self.left = u16::from_be_bytes([self.len_hi, b[0]]) as usize;
                    self.header = 0;
                }
                _ => {}
            }
            b = &b[1..];
        }
    }

    fn at_boundary(&self) -> bool {
        self.header == 0 && self.left == 0
    }
}

/// A read buffer that shows the record scan the bytes a read put in it, when the read reports
/// them (`set_init`): that is the one moment the trait says where they are, whatever the buffer
/// type (a pointer taken before the read may not survive the buffer's moves). Nothing is copied.
struct Scanned<T> {
    buf: T,
    scan: RecordScan,
    /// The count the read reported through `set_init`; `None` until it does.
    fed: Option<usize>,
}

impl<T> Scanned<T> {
    fn new(buf: T, scan: RecordScan) -> Scanned<T> {
        Scanned {
            buf,
            scan,
            fed: None,
        }
    }

    /// The scan after a read that returned `n`. Were the bytes not reported exactly once, as
    /// `n`, the scan loses step (the connection is then never taken for one at a boundary).
    fn scanned(&self, n: usize) -> RecordScan {
        let mut scan = self.scan;
        if self.fed != Some(n) {
            scan.left = usize::MAX;
        }
        scan
    }
}

// SAFETY: `write_ptr` and `bytes_total` pass on the inner buffer's own answers, so the runtime
// reads into exactly the memory `T` offers, under `T`'s guarantees (the address stays valid
// while the runtime holds the buffer, `bytes_total` bytes are writable there); `set_init`
// passes the call on after looking at the bytes (see its SAFETY).
unsafe impl<T: IoBufMut> IoBufMut for Scanned<T> {
    fn write_ptr(&mut self) -> *mut u8 {
        self.buf.write_ptr()
    }

    fn bytes_total(&mut self) -> usize {
        self.buf.bytes_total()
    }

    unsafe fn set_init(&mut self, pos: usize) {
        // SAFETY: the caller of `set_init` guarantees that the `pos` bytes from `write_ptr()`
        // on are initialised and owned by the buffer (the trait's contract). `write_ptr()` is
        // asked here, of the buffer where it lies now, before the inner `set_init` may move
        // its mark; the slice is dropped when `feed` returns, and until then `&mut self` keeps
        // the buffer from being written or moved.
        let got = unsafe { std::slice::from_raw_parts(self.buf.write_ptr(), pos) };
        self.scan.feed(got);
        self.fed = match self.fed {
            None => Some(pos),
            Some(_) => Some(usize::MAX),
        };
        // SAFETY: the caller's guarantee, passed on unchanged.
        unsafe { self.buf.set_init(pos) }
    }
}

/// The TCP stream under a TLS session.
pub struct Sock {
    tcp: TcpStream,
    flags: Rc<SockFlags>,
}

impl Sock {
    /// `scan`: follow the record framing from the first byte (a connection this side opens;
    /// an accepted one is wrapped after its handshake, mid-stream).
    fn new(tcp: TcpStream, scan: bool) -> (Sock, Rc<SockFlags>) {
        let flags = Rc::new(SockFlags::default());
        if scan {
            flags.scan.set(Some(RecordScan::default()));
        }
        (
            Sock {
                tcp,
                flags: flags.clone(),
            },
            flags,
        )
    }
}

impl AsyncReadRent for Sock {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        if self.flags.probing.get() {
            return (Err(io::ErrorKind::WouldBlock.into()), buf);
        }
        let Some(scan) = self.flags.scan.get() else {
            return self.tcp.read(buf).await;
        };
        let (r, read) = self.tcp.read(Scanned::new(buf, scan)).await;
        if let Ok(n) = r {
            self.flags.scan.set(Some(read.scanned(n)));
        }
        (r, read.buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        if self.flags.probing.get() {
            return (Err(io::ErrorKind::WouldBlock.into()), buf);
        }
        let r = self.tcp.readv(buf).await;
        if let (Ok(n), Some(mut scan)) = (&r.0, self.flags.scan.get()) {
            if *n > 0 {
                // monoio-rustls reads with `read`; bytes not followed make the scan give up
                // (the connection is then never taken for one at a record boundary).
                scan.left = usize::MAX;
                self.flags.scan.set(Some(scan));
            }
        }
        r
    }
}

impl AsyncWriteRent for Sock {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if self.flags.closing.get() {
            // SAFETY: `IoBuf`'s contract: `bytes_init()` initialised bytes lie at `read_ptr()`
            // while the buffer is neither moved nor changed. `buf` stays borrowed, unmoved,
            // for as long as `bytes` lives (this block), and nothing here changes it.
            let bytes = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            let r = self.write_now(bytes);
            return (r, buf);
        }
        self.flags.writing.set(true);
        let r = self.tcp.write(buf).await;
        self.flags.writing.set(false);
        r
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if self.flags.closing.get() {
            // monoio-rustls writes records with `write`; nothing else is sent while closing.
            return (Err(io::ErrorKind::WouldBlock.into()), buf);
        }
        self.flags.writing.set(true);
        let r = self.tcp.writev(buf).await;
        self.flags.writing.set(false);
        r
    }

    fn flush(&mut self) -> impl Future<Output = io::Result<()>> {
        self.tcp.flush()
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        let tail = if self.flags.closing.get() {
            self.flags.tail.take()
        } else {
            Vec::new()
        };
        if tail.is_empty() {
            return self.tcp.shutdown().await;
        }
        // The write side is shut by the task that sends the tail; nothing more may be written
        // here after it (the flag makes the stream's writes fail).
        self.flags.writing.set(true);
        if LateCloses::hand_off(&self.tcp, tail) {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

impl Sock {
    /// A write while closing: one non-blocking `send`, and what finds no room goes to the
    /// tail (so do all bytes once a tail is started: they go out in order). Answers that all
    /// of `bytes` were written, or an error of the socket, or `WouldBlock` when the tail would
    /// pass [`CLOSE_TAIL_MAX`].
    fn write_now(&mut self, bytes: &[u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut tail = self.flags.tail.take();
        let sent = if tail.is_empty() {
            // SAFETY: `send` only reads `bytes.len()` bytes at `bytes.as_ptr()`, a live
            // slice, and returns before this block ends; the fd is this stream's own socket.
            let n = unsafe {
                libc::send(
                    self.tcp.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
                0
            } else {
                n as usize
            }
        } else {
            0
        };
        let rest = &bytes[sent.min(bytes.len())..];
        if tail.len() + rest.len() > CLOSE_TAIL_MAX {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        tail.extend_from_slice(rest);
        self.flags.tail.set(tail);
        Ok(bytes.len())
    }
}

/// The most bytes a closing TLS connection keeps for the socket when its buffer is full: the
/// `close_notify` alert and what rustls still had to send (at most a buffer of records).
pub const CLOSE_TAIL_MAX: usize = 64 * 1024;

/// How long a closing TLS connection waits for room in the socket buffer to send the rest of
/// its last records and its `close_notify`.
pub const CLOSE_TAIL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most connections a worker lets finish their `close_notify` at once in tasks of their own.
pub const LATE_CLOSES_MAX: usize = 256;

thread_local! {
    /// Guards ([`LateCloses`]) alive on this thread: late closes are allowed while it is not
    /// 0. A count, not a flag, so that a second guard (nested, or another on the same thread)
    /// dropped first does not end them for the first.
    static LATE_GUARDS: Cell<usize> = const { Cell::new(0) };
    /// Late closes under way on this thread (their tasks not yet dropped). Kept apart from the
    /// guards: a guard taken while some are under way does not forget them.
    static LATE: Cell<usize> = const { Cell::new(0) };
    /// How long a late close waits: [`CLOSE_TAIL_WAIT`], unless a test says otherwise.
    static LATE_WAIT: Cell<std::time::Duration> = const { Cell::new(CLOSE_TAIL_WAIT) };
}

/// Lets TLS connections closed where nothing can wait ([`Guarded::close_notify_now`]: the
/// upstream pool, a dropped connection) finish their goodbye in a task of their own when the
/// socket buffer is full: the rest of the last records and the `close_notify` are written as
/// room comes, for at most [`CLOSE_TAIL_WAIT`], then the write side is shut and the socket
/// closed. A peer that stopped reading holds a file descriptor and the tail that long, no
/// more, and no more than [`LATE_CLOSES_MAX`] at once; past that, and on a thread without the
/// guard, the alert is left unsent, as before. Held (as a guard) by the main future of a
/// runtime with a timer: a task can be spawned, and sleep, on that thread.
pub struct LateCloses(());

impl LateCloses {
    /// Allows late closes on this thread until the guard is dropped (guards nest: late closes
    /// stay allowed until the last one is dropped).
    pub fn allow() -> LateCloses {
        LATE_GUARDS.with(|g| g.set(g.get() + 1));
        LateCloses(())
    }

    /// As [`LateCloses::allow`], each waiting up to `wait` (a test on a loaded machine).
    #[cfg(test)]
    fn allow_waiting(wait: std::time::Duration) -> LateCloses {
        LATE_WAIT.with(|w| w.set(wait));
        LateCloses::allow()
    }

    /// Late closes under way on this thread.
    pub fn pending() -> usize {
        LATE.with(|l| l.get())
    }

    /// Hands `tail` to a task that sends it on a duplicate of `tcp`'s descriptor (the socket
    /// stays open until that task ends), then shuts the write side. `false` when late closes
    /// are not allowed here or too many are under way, or the descriptor cannot be duplicated.
    fn hand_off(tcp: &TcpStream, tail: Vec<u8>) -> bool {
        use std::os::fd::{AsRawFd, BorrowedFd};
        if LATE_GUARDS.with(|g| g.get()) == 0 || LateCloses::pending() >= LATE_CLOSES_MAX {
            return false;
        }
        // SAFETY: the descriptor is `tcp`'s own, which keeps it open while `tcp` is borrowed
        // (all of this function); `fd` serves only to make the duplicate on the next line.
        let fd = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
        let Ok(dup) = fd.try_clone_to_owned() else {
            return false;
        };
        // Counted before the task is spawned, and counted down by `done`, which the task owns
        // from the start: a task dropped before its first poll (the runtime dropped with it
        // queued) counts down too. Before, the guard was made inside the task, so such a task
        // left the count raised for good.
        let done = LateDone::start();
        monoio::spawn(async move {
            let _done = done;
            let Ok(mut s) = TcpStream::from_std(std::net::TcpStream::from(dup)) else {
                return;
            };
            let wait = LATE_WAIT.with(|w| w.get());
            let sent = monoio::time::timeout(wait, s.write_all(tail)).await;
            if matches!(sent, Ok((Ok(_), _))) {
                let _ = s.shutdown().await;
            }
        });
        true
    }
}

impl Drop for LateCloses {
    fn drop(&mut self) {
        let _ = LATE_GUARDS.try_with(|g| {
            let left = g.get().saturating_sub(1);
            g.set(left);
            if left == 0 {
                let _ = LATE_WAIT.try_with(|w| w.set(CLOSE_TAIL_WAIT));
            }
        });
    }
}

/// One late close under way: counted when made, counted as done when dropped, however its
/// task ends (sent, timed out, dropped with the runtime, polled or not).
struct LateDone(());

impl LateDone {
    fn start() -> LateDone {
        LATE.with(|l| l.set(l.get() + 1));
        LateDone(())
    }
}

impl Drop for LateDone {
    fn drop(&mut self) {
        let _ = LATE.try_with(|l| l.set(l.get().saturating_sub(1)));
    }
}

/// A monoio-rustls stream whose reads and writes may be dropped before they complete
/// (timeouts, a shutdown while idle). A dropped read leaves the read side unusable (its buffer
/// went with it); a dropped write, or a read dropped while it was writing an alert, leaves the
/// write side unusable. Calls on an unusable side fail instead of panicking, and `shutdown`
/// (close_notify) is sent whenever the write side is intact: an idle connection closed by a
/// timeout or a shutdown still says goodbye.
pub struct Guarded<S> {
    inner: S,
    reading: bool,
    writing: bool,
    /// Shared with the socket: a write under way (left set by a dropped one), probing.
    sock: Rc<SockFlags>,
    /// The negotiated protocol version ("1.2", "1.3"), for the access log.
    version: Option<&'static str>,
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "a cancelled TLS read or write left the stream unusable",
    )
}

impl<S> Guarded<S> {
    fn new(inner: S, sock: Rc<SockFlags>) -> Guarded<S> {
        Guarded {
            inner,
            reading: false,
            writing: false,
            sock,
            version: None,
        }
    }

    /// The TLS version the handshake negotiated ("1.2" or "1.3"), when known.
    pub fn tls_version(&self) -> Option<&'static str> {
        self.version
    }

    /// Writes (and reads, which may write an alert) need monoio-rustls's write buffer.
    fn write_ok(&self) -> bool {
        !self.writing && !self.sock.writing.get()
    }

    fn read_ok(&self) -> bool {
        !self.reading && self.write_ok()
    }
}

impl<S: AsyncReadRent + AsyncWriteRent> Guarded<S> {
    /// Whether input is waiting inside the TLS layer: decrypted bytes in rustls, or records
    /// already read off the socket and not yet decrypted (monoio-rustls's read buffer). A peek
    /// at the raw socket sees neither. Looks without any socket I/O: a read that would reach
    /// the socket gets `WouldBlock` instead. Anything found (data, a close_notify, an error)
    /// is consumed and the answer is `true`: the stream is then fit only to be closed. `buf`
    /// (any spare buffer; nothing is kept in it) comes back unless the look could not finish
    /// at once, which leaves the read side unusable and also answers `true`.
    pub fn buffered_input<T: IoBufMut>(&mut self, buf: T) -> (bool, Option<T>) {
        use std::task::{Context, Poll, Waker};
        if !self.read_ok() {
            return (true, Some(buf));
        }
        self.sock.probing.set(true);
        let polled = {
            let fut = std::pin::pin!(self.inner.read(buf));
            fut.poll(&mut Context::from_waker(Waker::noop()))
        };
        self.sock.probing.set(false);
        match polled {
            // Nothing decrypted is waiting, and every byte read off the socket went to rustls;
            // but when those bytes end inside a record, rustls holds that partial record, and
            // its rest, still on its way, would be read as the start of the next response.
            Poll::Ready((Err(e), buf)) if e.kind() == io::ErrorKind::WouldBlock => {
                let mid_record = self.sock.scan.get().is_some_and(|s| !s.at_boundary());
                (mid_record, Some(buf))
            }
            Poll::Ready((_, buf)) => (true, Some(buf)),
            Poll::Pending => {
                // Only an alert write can wait here; the buffers went with the future.
                self.reading = true;
                (true, None)
            }
        }
    }
}

impl ServerStream {
    /// The client's TCP connection, its TLS session dropped without a word (no
    /// `close_notify`): for a connection that ends with a reset after a cut response.
    pub fn into_tcp(self) -> TcpStream {
        self.inner.into_parts().0.tcp
    }
}

impl<S: AsyncReadRent + AsyncWriteRent> Guarded<S> {
    /// Sends `close_notify` now, before the connection is dropped (RFC 8446 §6.1: a party
    /// closing its write side sends it first), for connections closed where nothing can wait:
    /// a pooled upstream connection evicted or expired, one not pooled after its response, one
    /// dropped after an error. The alert is written with non-blocking sends while this runs,
    /// and the write side is shut. When the socket buffer has no room for all of it, the rest
    /// goes to a task of its own that sends it as room comes, within [`CLOSE_TAIL_WAIT`], then
    /// shuts the write side ([`LateCloses`]); where that is not allowed, the alert is not sent.
    /// Skipped when a dropped write left the write side unusable (a record may be half
    /// written).
    pub fn close_notify_now(&mut self) {
        use std::task::{Context, Waker};
        if !self.write_ok() {
            return;
        }
        self.sock.closing.set(true);
        let polled = {
            let fut = std::pin::pin!(self.inner.shutdown());
            fut.poll(&mut Context::from_waker(Waker::noop()))
        };
        self.sock.closing.set(false);
        // Left when the shutdown failed before it reached the socket's (a tail too long).
        drop(self.sock.tail.take());
        if polled.is_pending() {
            // Every socket call above returns at once, so this does not happen; were it to,
            // the write buffer went with the future.
            self.writing = true;
        }
    }
}

impl<S: AsyncReadRent + AsyncWriteRent> AsyncReadRent for Guarded<S> {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.read_ok() {
            return (Err(broken()), buf);
        }
        self.reading = true;
        let r = self.inner.read(buf).await;
        self.reading = false;
        r
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.read_ok() {
            return (Err(broken()), buf);
        }
        self.reading = true;
        let r = self.inner.readv(buf).await;
        self.reading = false;
        r
    }
}

impl<S: AsyncReadRent + AsyncWriteRent> AsyncWriteRent for Guarded<S> {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.write_ok() {
            return (Err(broken()), buf);
        }
        self.writing = true;
        let r = self.inner.write(buf).await;
        self.writing = false;
        r
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.write_ok() {
            return (Err(broken()), buf);
        }
        self.writing = true;
        let r = self.inner.writev(buf).await;
        self.writing = false;
        r
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.write_ok() {
            return Err(broken());
        }
        self.writing = true;
        let r = self.inner.flush().await;
        self.writing = false;
        r
    }

    /// Sends `close_notify`, then shuts the TCP write side. A read dropped while it waited for
    /// the socket does not prevent it; one dropped while writing an alert does.
    async fn shutdown(&mut self) -> io::Result<()> {
        if !self.write_ok() {
            return Err(broken());
        }
        self.writing = true;
        let r = self.inner.shutdown().await;
        self.writing = false;
        r
    }
}

/// What a failed read of a TLS stream says about the TLS layer: `None` when the error is not
/// the TLS layer's own (monoio-rustls hands rustls's error on inside the `io::Error`);
/// `Some(true)` for an alert by which the peer refuses the handshake as a client completed
/// it (its certificate, or its absence, or its Finished: RFC 8446 §4.4.2.4, §6.2), which a
/// TLS 1.3 server sends after the client took the handshake as done; `Some(false)` for any
/// other alert (close_notify aside: it reads as the end of the stream) or a record rustls
/// refused.
pub fn tls_failure(e: &io::Error) -> Option<bool> {
    use rustls::AlertDescription as A;
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(matches!(
        inner,
        rustls::Error::AlertReceived(
            A::HandshakeFailure
                | A::NoCertificate
                | A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::DecryptError
                | A::CertificateRequired
                | A::CertificateUnobtainable
                | A::BadCertificateHashValue
        )
    ))
}

/// Sends `close_notify` within `limit` (a client that stopped reading does not hold the task).
pub async fn close_notify<S: AsyncWriteRent>(s: &mut S, limit: std::time::Duration) {
    let _ = monoio::time::timeout(limit, s.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected loopback pair: the runtime's end (made inside it) and the peer's, which
    /// reads nothing.
    fn loopback_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        (ours, peer)
    }

    fn timer_runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
    }

    /// RFC 8446 §6.1 late closes: a late close whose task is dropped before it was ever polled
    /// (its runtime dropped with the task still queued) is counted as done. Before, the
    /// counting guard was made inside the task, so such a task left the count raised for as
    /// long as the thread lived.
    #[test]
    fn rfc8446_6_1_a_late_close_dropped_before_its_first_poll_is_counted_as_done() {
        let _late = LateCloses::allow();
        let (ours, _peer) = loopback_pair();
        let mut rt = timer_runtime();
        rt.block_on(async move {
            let tcp = TcpStream::from_std(ours).unwrap();
            assert!(LateCloses::hand_off(&tcp, b"tail".to_vec()));
            assert_eq!(LateCloses::pending(), 1);
            // Returns without yielding: the task is never polled.
        });
        drop(rt);
        assert_eq!(LateCloses::pending(), 0, "the dropped task counted down");
    }

    /// RFC 8446 §6.1 late closes: guards on one thread nest. A second guard neither forgets
    /// the late closes under way nor, once dropped, ends late closes for the first. Before,
    /// each guard set the count to 0 when made and to "not allowed" when dropped.
    #[test]
    fn rfc8446_6_1_late_close_guards_nest() {
        let (a, _pa) = loopback_pair();
        let (b, _pb) = loopback_pair();
        let (c, _pc) = loopback_pair();
        let mut rt = timer_runtime();
        rt.block_on(async move {
            let (a, b, c) = (
                TcpStream::from_std(a).unwrap(),
                TcpStream::from_std(b).unwrap(),
                TcpStream::from_std(c).unwrap(),
            );
            let outer = LateCloses::allow();
            assert!(LateCloses::hand_off(&a, b"tail".to_vec()));
            let inner = LateCloses::allow();
            assert_eq!(LateCloses::pending(), 1, "a second guard keeps the count");
            drop(inner);
            assert!(
                LateCloses::hand_off(&b, b"tail".to_vec()),
                "still allowed while the first guard lives"
            );
            assert_eq!(LateCloses::pending(), 2);
            drop(outer);
            assert!(
                !LateCloses::hand_off(&c, b"tail".to_vec()),
                "not allowed once no guard is left"
            );
        });
        drop(rt);
        assert_eq!(LateCloses::pending(), 0);
    }

    /// A DER element: tag, short length, content.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 0x80);
        [&[tag, content.len() as u8][..], content].concat()
    }

    fn atv(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        tlv(0x30, &[tlv(0x06, oid), tlv(tag, value)].concat())
    }

    fn rfc4514(name_der: &[u8]) -> String {
        use x509_parser::prelude::FromDer;
        let (_, name) = x509_parser::x509::X509Name::from_der(name_der).expect("name");
        let mut out = Vec::new();
        write_rfc4514(&name, &mut out);
        String::from_utf8(out).expect("header-safe ASCII")
    }

    /// RFC 4514 §2.1 (last RDN first), §2.2 (`+` within a multi-valued RDN), §2.3 and §2.4
    /// (an unknown type as its dotted OID, its value as `#` and the hex of its DER).
    #[test]
    fn rfc4514_order_multi_valued_rdns_and_unknown_types() {
        let o = atv(&[0x55, 4, 10], 0x0c, b"Example");
        let cn = atv(&[0x55, 4, 3], 0x0c, b"alice");
        let ou = atv(&[0x55, 4, 11], 0x13, b"admins");
        let email = atv(
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
            0x16,
            b"a@b",
        );
        let dc = atv(
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
            0x16,
            b"example",
        );
        let name = tlv(
            0x30,
            &[
                tlv(0x31, &dc),
                tlv(0x31, &o),
                tlv(0x31, &[cn, ou].concat()),
                tlv(0x31, &email),
            ]
            .concat(),
        );
        assert_eq!(
            rfc4514(&name),
            "1.2.840.113549.1.9.1=#1603614062,CN=alice+OU=admins,O=Example,DC=example"
        );
        // A value of a known type that is not a string (here an INTEGER): `#` and hex.
        let odd = tlv(0x30, &tlv(0x31, &atv(&[0x55, 4, 3], 0x02, &[1, 2])));
        assert_eq!(rfc4514(&odd), "CN=#02020102");
        // NUL and a non-ASCII character: `\00`, then the percent-encoding of the header.
        let nul = tlv(
            0x30,
            &tlv(0x31, &atv(&[0x55, 4, 3], 0x0c, "a\0é%".as_bytes())),
        );
        assert_eq!(rfc4514(&nul), "CN=a\\00%C3%A9%25");
        // Nothing but a space: escaped once.
        let sp = tlv(0x30, &tlv(0x31, &atv(&[0x55, 4, 3], 0x0c, b" ")));
        assert_eq!(rfc4514(&sp), "CN=\\20");
    }

    /// RFC 8446 §5.1: records are a 5-byte header (type, version, length) and the fragment.
    /// Fed whole or split at every byte, the scan is at a boundary exactly between records.
    #[test]
    fn record_scan_follows_framing_split_at_every_byte() {
        let rec = |len: usize| {
            let mut r = vec![23, 3, 3, (len >> 8) as u8, len as u8];
            r.extend(std::iter::repeat_n(0xaa, len));
            r
        };
        let stream = [rec(3), rec(0), rec(300), rec(1)].concat();
        let ends = [8, 13, 318, 324];
        for cut in 0..=stream.len() {
            let mut s = RecordScan::default();
            s.feed(&stream[..cut]);
            let at = s.at_boundary();
            assert_eq!(at, cut == 0 || ends.contains(&cut), "cut {cut}");
            s.feed(&stream[cut..]);
            assert!(s.at_boundary(), "cut {cut}: the whole stream");
        }
        let mut s = RecordScan::default();
        for b in &stream {
            s.feed(std::slice::from_ref(b));
        }
        assert!(s.at_boundary());
        // Lost step: never a boundary again.
        s.left = usize::MAX;
        s.feed(&stream);
        assert!(!s.at_boundary());
    }

    /// A buffer the `IoBufMut` contract admits whose bytes move when the read reports them:
    /// `set_init` copies them to a second allocation and overwrites the first with 0xff.
    struct Relocating {
        first: Box<[u8]>,
        second: Box<[u8]>,
        init: usize,
    }

    // SAFETY: `first` is a heap allocation that no method moves or frees; `bytes_total` is
    // its length.
    unsafe impl IoBufMut for Relocating {
        fn write_ptr(&mut self) -> *mut u8 {
            self.first.as_mut_ptr()
        }

        fn bytes_total(&mut self) -> usize {
            self.first.len()
        }

        unsafe fn set_init(&mut self, pos: usize) {
            self.second[self.init..self.init + pos].copy_from_slice(&self.first[..pos]);
            self.first.fill(0xff);
            self.init += pos;
        }
    }

    /// RFC 8446 §5.1 framing is followed in the bytes a read got, taken where the buffer holds
    /// them when the read reports them, for any buffer type a read admits: a pointer taken
    /// before the read saw 0xff here (and, for a buffer stored inline, memory it had left).
    #[test]
    fn record_scan_reads_the_bytes_where_the_buffer_reports_them() {
        let record = [23u8, 3, 3, 0, 2, 0xaa, 0xbb];
        let check = || async move {
            let l = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let mut c = TcpStream::connect(l.local_addr().expect("addr"))
                .await
                .expect("connect");
            let (srv, _) = l.accept().await.expect("accept");
            let (r, _) = c.write_all(record.to_vec()).await;
            r.expect("write");
            let (mut sock, flags) = Sock::new(srv, true);
            let mut buf = Relocating {
                first: vec![0; 64].into_boxed_slice(),
                second: vec![0; 64].into_boxed_slice(),
                init: 0,
            };
            while buf.init < record.len() {
                let (r, b) = sock.read(buf).await;
                assert!(r.expect("read") > 0, "early EOF");
                buf = b;
            }
            assert_eq!(&buf.second[..buf.init], &record[..]);
            let scan = flags.scan.get().expect("scanned");
            assert!(scan.at_boundary(), "one whole record read");
        };
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime")
            .block_on(check());
        // io_uring too, where the kernel and the memlock limit allow it.
        if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().build() {
            rt.block_on(check());
        }
    }

    fn setsockopt_int(fd: std::os::fd::RawFd, level: i32, opt: i32, v: libc::c_int) {
        // SAFETY: `v` is a live c_int and its size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt {opt}");
    }

    /// Bytes in a socket's send queue not yet acknowledged by the peer.
    fn outq(fd: std::os::fd::RawFd) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one c_int at the pointer given, a live local.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
        assert_eq!(rc, 0, "TIOCOUTQ");
        n as usize
    }

    /// RFC 8446 §6.1: each party MUST send close_notify before closing its write side. An
    /// upstream TLS connection the gateway drops (the pool's path) while its socket buffer is
    /// full (the peer has stopped reading, or, over a long path, the bytes in flight fill it)
    /// still ends with close_notify once the peer reads again within the bound: the peer gets
    /// every byte, then a clean end (rustls's reader answers Ok(0)), not a close without the
    /// alert (UnexpectedEof). A Unix stream pair stands in for the TCP connection: loopback TCP
    /// appends a small send to its last unsent segment whatever the buffer's size, so no state
    /// of it refuses a 24-byte alert at will; a Unix stream socket refuses every send once its
    /// buffer is spent. The code under test only sends, shuts and closes the descriptor.
    #[test]
    fn rfc8446_6_1_close_notify_is_sent_when_the_socket_buffer_is_full_at_close() {
        use monoio::io::AsyncReadRentExt;
        use std::io::{Read, Write};
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::os::unix::net::UnixStream;
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = CertificateDer::from(key.cert.der().to_vec());
        let pk = PrivateKeyDer::try_from(key.signing_key.serialize_der()).unwrap();
        let server_cfg = Arc::new(
            ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(vec![cert], pk)
                .unwrap(),
        );
        let (client_end, server_end) = UnixStream::pair().unwrap();
        let (report_rx, report_tx) = UnixStream::pair().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            server_end
                .set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
            let conn = ServerConnection::new(server_cfg).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, server_end);
            tls.write_all(b"hi").unwrap();
            tls.flush().unwrap();
            // Stops reading until the client has dropped the connection.
            go_rx.recv().unwrap();
            let mut got = Vec::new();
            let clean = tls.read_to_end(&mut got).is_ok();
            let mut report = report_tx;
            report
                .write_all(&[&[clean as u8][..], &(got.len() as u64).to_be_bytes()].concat())
                .unwrap();
        });
        let up = UpstreamTlsConfig {
            ca: None,
            sni: Some("localhost".into()),
            client_cert: None,
            client_key: None,
            verify: false,
        };
        let tls = upstream_tls(&up, "t", &["localhost:443"]).unwrap();
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build();
        let (clean, got, sent) = rt.expect("runtime").block_on(async move {
            let _late = LateCloses::allow_waiting(std::time::Duration::from_secs(30));
            let fd = client_end.as_raw_fd();
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 256 * 1024);
            let tcp =
                TcpStream::from_std(std::net::TcpStream::from(OwnedFd::from(client_end))).unwrap();
            let mut s = connect(&tls, 0, tcp).await.unwrap();
            let (r, hi) = s.read_exact(vec![0u8; 2]).await;
            r.unwrap();
            assert_eq!(hi, b"hi");
            // Records until 32 KiB wait for the peer, every write complete.
            let mut sent = 0usize;
            while outq(fd) < 32 * 1024 {
                assert!(sent < 64 << 20, "the send queue never filled");
                let (r, _) = s.write_all(vec![b'x'; 1024]).await;
                r.unwrap();
                sent += 1024;
            }
            // Then the buffer shrinks under what it holds: no room for one more byte.
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 1);
            drop(crate::upstream::UpStream::Tls(Box::new(s), fd));
            assert_eq!(LateCloses::pending(), 1, "the alert found no room at once");
            go_tx.send(()).unwrap();
            let mut report = monoio::net::UnixStream::from_std(report_rx).expect("report stream");
            let (res, v) = report.read_exact(vec![0u8; 9]).await;
            res.unwrap();
            assert_eq!(LateCloses::pending(), 0, "the late close is over");
            let got = u64::from_be_bytes(v[1..9].try_into().unwrap()) as usize;
            (v[0] == 1, got, sent)
        });
        server.join().unwrap();
        assert_eq!(got, sent, "every byte written reached the peer");
        assert!(
            clean,
            "the stream ended with close_notify, not a bare close"
        );
    }

    #[test]
    fn endpoint_names_come_from_sni_or_the_address_host() {
        let dns = |s: &str| ServerName::try_from(s.to_string()).unwrap();
        assert_eq!(
            endpoint_name(None, "localhost:9443"),
            Some(dns("localhost"))
        );
        assert_eq!(
            endpoint_name(None, "127.0.0.1:9443"),
            Some(dns("127.0.0.1"))
        );
        assert_eq!(endpoint_name(None, "[::1]:9443"), Some(dns("::1")));
        assert_eq!(
            endpoint_name(Some("api.internal"), "10.0.0.1:443"),
            Some(dns("api.internal"))
        );
        assert_eq!(endpoint_name(Some("not a name"), "10.0.0.1:443"), None);
    }
}
