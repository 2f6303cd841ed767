//! TLS over real sockets with real handshakes: termination, SNI, versions, resumption, mTLS,
//! TLS to upstreams, the https redirect, and config refusals. Certificates are made at test
//! time with rcgen (`support::pki`); the client side is a synchronous rustls client over std's TcpStream.
//! Socket scenarios run on both monoio drivers.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, ProtocolVersion,
    ServerConfig, ServerConnection, StreamOwned,
};

use ringway::config::Config;
use support::pki::*;
use support::*;

// ---------------------------------------------------------------------------------------------
// A synchronous TLS client.

static TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

#[derive(Default)]
struct ClientOpts {
    versions: Option<&'static [&'static rustls::SupportedProtocolVersion]>,
    /// Client certificate: file stem ("client", "stranger").
    cert: Option<&'static str>,
    /// Accept any server certificate (to look at which one was sent).
    any_cert: bool,
    /// ALPN protocols offered (default: http/1.1).
    alpn: Option<Alpn>,
}

fn client_config(o: ClientOpts) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(o.versions.unwrap_or(rustls::DEFAULT_VERSIONS))
        .unwrap();
    let b = if o.any_cert {
        b.dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
    } else {
        b.with_root_certificates(roots("ca.pem"))
    };
    let mut cfg = match o.cert {
        None => b.with_no_client_auth(),
        Some(stem) => b
            .with_client_auth_cert(
                certs(&pki().read(&format!("{stem}.pem"))),
                key(&pki().read(&format!("{stem}.key"))),
            )
            .unwrap(),
    };
    cfg.alpn_protocols = match o.alpn {
        None => vec![b"http/1.1".to_vec()],
        Some(l) => l.iter().map(|p| p.to_vec()).collect(),
    };
    Arc::new(cfg)
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct TlsClient {
    s: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl TlsClient {
    /// Connects and completes the handshake; Err is the handshake's failure.
    fn connect(addr: SocketAddr, sni: &str, cfg: Arc<ClientConfig>) -> std::io::Result<TlsClient> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(sni.to_string()).expect("server name");
        let conn = ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(TlsClient { s, buf: Vec::new() })
    }

    fn peer_names(&self) -> Vec<String> {
        let der = &self.s.conn.peer_certificates().expect("server certificate")[0];
        let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
        let san = x.subject_alternative_name().unwrap().expect("SAN");
        san.value
            .general_names
            .iter()
            .map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(n) => n.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()
    }

    /// Reads one response (Content-Length bodies; the gateway's and these upstreams' are).
    fn read_response(&mut self) -> std::io::Result<Resp> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).expect("valid response") {
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).to_string(),
                        )
                    })
                    .collect();
                let mut resp = Resp {
                    status: r.code.unwrap(),
                    version: r.version.unwrap(),
                    headers,
                    body: Vec::new(),
                };
                self.buf.drain(..n);
                let cl: usize = resp
                    .header("content-length")
                    .map_or(0, |v| v.parse().unwrap());
                while self.buf.len() < cl {
                    self.fill()?;
                }
                resp.body = self.buf.drain(..cl).collect();
                return Ok(resp);
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut tmp = [0u8; 16384];
        match self.s.read(&mut tmp)? {
            0 => Err(ErrorKind::UnexpectedEof.into()),
            n => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(())
            }
        }
    }

    fn get(&mut self, host: &str, path: &str) -> std::io::Result<Resp> {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
        self.read_response()
    }
}

/// The headers the echo upstream saw, from its JSON answer.
fn seen_headers(r: &Resp) -> Vec<(String, String)> {
    let v = r.json();
    v["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_ascii_lowercase(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn seen(r: &Resp, name: &str) -> Vec<String> {
    seen_headers(r)
        .into_iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Configs.

fn tls_listener(extra: &str) -> String {
    let p = pki();
    format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}, {{ cert = \"{}\", key = \"{}\" }}]{extra} }}\n",
        p.path("a-chain.pem"),
        p.path("a.key"),
        p.path("wild-chain.pem"),
        p.path("wild.key"),
    )
}

fn tls_gateway(up: SocketAddr, listener_extra: &str, rest: &str) -> String {
    format!(
        "{}\n[upstreams.up]\nendpoints = [{{ address = \"{up}\" }}]\n\n{rest}\n",
        tls_listener(listener_extra)
    )
}

fn mtls(mode: &str) -> String {
    format!(
        ", client_auth = {{ ca = \"{}\", mode = \"{mode}\" }}",
        pki().path("ca.pem")
    )
}

const ALL: &str = "[[routes]]\nupstream = \"up\"\n";

// ---------------------------------------------------------------------------------------------
// Termination.

#[test]
fn proxies_over_tls_with_forwarded_proto_https() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        let mut c = TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default()))
            .unwrap_or_else(|e| panic!("{d:?}: handshake: {e}"));
        assert_eq!(c.s.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "{d:?}");
        let r = c.get("a.test", "/x?y=1").unwrap();
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_eq!(seen(&r, "x-forwarded-proto"), vec!["https"], "{d:?}");
        assert_eq!(r.json()["target"], "/x?y=1");
    }
}

type Alpn = &'static [&'static [u8]];

/// RFC 7301 §3.1-3.2: the server picks, in its own order of preference, a protocol the
/// client offered; HTTP/1.0 is served, so a client offering only `http/1.0` gets it rather
/// than a fatal no_application_protocol alert.
#[test]
fn alpn_selects_http11_first_and_accepts_http10_alone() {
    // Offered, chosen, and the request's HTTP version.
    let cases: [(Alpn, &[u8], &str); 4] = [
        (&[b"http/1.0"], b"http/1.0", "HTTP/1.0"),
        (&[b"http/1.0", b"http/1.1"], b"http/1.1", "HTTP/1.1"),
        (&[b"h2", b"http/1.1"], b"http/1.1", "HTTP/1.1"),
        (&[b"http/1.1"], b"http/1.1", "HTTP/1.1"),
    ];
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        for (offered, chosen, version) in cases {
            let o = ClientOpts {
                alpn: Some(offered),
                ..ClientOpts::default()
            };
            let mut c = TlsClient::connect(gw.addr, "a.test", client_config(o))
                .unwrap_or_else(|e| panic!("{d:?} {offered:?}: handshake: {e}"));
            assert_eq!(c.s.conn.alpn_protocol(), Some(chosen), "{d:?} {offered:?}");
            c.send(
                format!("GET /v {version}\r\nHost: a.test\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .unwrap();
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{d:?} {offered:?}: {}", r.text());
        }
        // Offering only a protocol the gateway does not speak is still refused.
        let o = ClientOpts {
            alpn: Some(&[b"h2"]),
            ..ClientOpts::default()
        };
        assert!(
            TlsClient::connect(gw.addr, "a.test", client_config(o)).is_err(),
            "{d:?}: h2 alone"
        );
    }
}

#[test]
fn keep_alive_pipelining_and_bodies_over_one_tls_connection() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        for i in 0..5 {
            let r = c.get("a.test", &format!("/n/{i}")).unwrap();
            assert_eq!(r.status, 200, "{d:?}");
            assert_eq!(r.json()["target"], format!("/n/{i}"));
        }
        // Two requests in one write, one with a body of 100 KiB.
        let body = vec![b'q'; 100 * 1024];
        let mut both = format!(
            "POST /big HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        both.extend_from_slice(&body);
        both.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n");
        c.send(&both).unwrap();
        let r1 = c.read_response().unwrap();
        assert_eq!(r1.status, 200, "{d:?}");
        assert_eq!(r1.json()["body"].as_str().unwrap().len(), body.len());
        let r2 = c.read_response().unwrap();
        assert_eq!(r2.json()["target"], "/after", "{d:?}");
        assert_eq!(up.hits(), 7);
    }
}

#[test]
fn connection_close_ends_with_close_notify() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        c.send(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{d:?}");
        // rustls reports a clean end (Ok(0)) only after a close_notify; a bare TCP close is
        // an UnexpectedEof error.
        let mut tmp = [0u8; 64];
        assert_eq!(c.s.read(&mut tmp).expect("clean TLS close"), 0, "{d:?}");
    }
}

/// Reads to the end of the stream: the bytes, and how it ended: `Ok` with close_notify
/// (rustls gives Ok(0) only after one), else the error (a bare TCP close is an
/// UnexpectedEof, a reset a ConnectionReset).
fn read_to_end(c: &mut TlsClient) -> (Vec<u8>, Result<(), ErrorKind>) {
    let mut all = std::mem::take(&mut c.buf);
    let mut tmp = [0u8; 16384];
    loop {
        match c.s.read(&mut tmp) {
            Ok(0) => return (all, Ok(())),
            Ok(n) => all.extend_from_slice(&tmp[..n]),
            Err(e) => {
                assert_ne!(e.kind(), ErrorKind::WouldBlock, "read timed out");
                return (all, Err(e.kind()));
            }
        }
    }
}

/// RFC 8446 §6.1 and RFC 9112 §8, §9.8: an HTTP/1.0 client reads a close-delimited body,
/// which over TLS it can only tell complete from cut by the close_notify. When the upstream's
/// body breaks off, the gateway sends none and resets the connection (as over plain TCP, see
/// `hostile_upstream.rs`); a complete body still ends with one.
#[test]
fn a_cut_body_to_an_http10_client_ends_without_close_notify() {
    let body = [b'x'; 50];
    for d in DRIVERS {
        let up = Upstream::start(move |req| {
            let mut r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n32\r\n".to_vec();
            r.extend_from_slice(&body);
            r.extend_from_slice(b"\r\n");
            if req.target == "/whole" {
                r.extend_from_slice(b"0\r\n\r\n");
            }
            // "/cut": the upstream closes with no terminal chunk.
            Reply::RawClose(r)
        });
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        for (path, clean) in [("/whole", true), ("/cut", false), ("/whole", true)] {
            let mut c = TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default()))
                .unwrap();
            c.send(format!("GET {path} HTTP/1.0\r\nHost: a.test\r\n\r\n").as_bytes())
                .unwrap();
            let (got, end) = read_to_end(&mut c);
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200"), "{d:?} {path}: {text}");
            assert!(text.ends_with(&"x".repeat(50)), "{d:?} {path}: {text}");
            let want = if clean {
                Ok(())
            } else {
                Err(ErrorKind::ConnectionReset)
            };
            assert_eq!(end, want, "{d:?} {path}: close_notify, or a reset");
        }
    }
}

#[test]
fn idle_connection_gets_close_notify_on_shutdown() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let mut gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        assert_eq!(c.get("a.test", "/").unwrap().status, 200);
        // Idle now: the gateway's read is waiting; the shutdown cancels it and still says
        // goodbye properly.
        gw.stop();
        let mut tmp = [0u8; 64];
        assert_eq!(c.s.read(&mut tmp).expect("clean TLS close"), 0, "{d:?}");
    }
}

#[test]
fn slow_head_over_tls_gets_a_408() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let toml = tls_gateway(
            up.addr,
            "",
            &format!("{ALL}\n[timeouts]\nclient_head = \"300ms\"\n"),
        );
        let gw = TestGateway::start(&toml, d);
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        // Half a head, then nothing: the head timeout cancels the gateway's read, and the 408
        // still goes out over TLS.
        c.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n").unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 408, "{d:?}");
        assert_eq!(r.json()["error"], "request_timeout");
    }
}

#[test]
fn sni_picks_exact_wildcard_or_default_certificate() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        let any = || {
            client_config(ClientOpts {
                any_cert: true,
                ..ClientOpts::default()
            })
        };
        let names = |sni: &str| {
            TlsClient::connect(gw.addr, sni, any())
                .unwrap()
                .peer_names()
        };
        assert_eq!(names("a.test"), vec!["a.test"], "{d:?}");
        assert_eq!(names("A.Test"), vec!["a.test"], "{d:?}: case-insensitive");
        assert_eq!(names("api.wild.test"), vec!["*.wild.test"], "{d:?}");
        // A wildcard covers one label only.
        assert_eq!(names("x.api.wild.test"), vec!["a.test"], "{d:?}");
        assert_eq!(names("unknown.test"), vec!["a.test"], "{d:?}: default");
        // An IP address as the name: no SNI is sent.
        assert_eq!(names("127.0.0.1"), vec!["a.test"], "{d:?}: no SNI");
        // And a verifying client accepts the wildcard certificate for its name.
        let mut c =
            TlsClient::connect(gw.addr, "b.wild.test", client_config(ClientOpts::default()))
                .unwrap();
        assert_eq!(c.get("b.wild.test", "/").unwrap().status, 200);
    }
}

#[test]
fn tls12_only_and_tls13_only_clients_both_work() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        for (versions, want) in [
            (TLS12_ONLY, ProtocolVersion::TLSv1_2),
            (TLS13_ONLY, ProtocolVersion::TLSv1_3),
        ] {
            let cfg = client_config(ClientOpts {
                versions: Some(versions),
                ..ClientOpts::default()
            });
            let mut c = TlsClient::connect(gw.addr, "a.test", cfg).unwrap();
            assert_eq!(c.s.conn.protocol_version(), Some(want), "{d:?}");
            assert_eq!(c.get("a.test", "/").unwrap().status, 200, "{d:?} {want:?}");
        }
    }
}

#[test]
fn min_version_13_refuses_a_tls12_client() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, ", min_version = \"1.3\"", ALL), d);
        let only12 = client_config(ClientOpts {
            versions: Some(TLS12_ONLY),
            ..ClientOpts::default()
        });
        assert!(
            TlsClient::connect(gw.addr, "a.test", only12).is_err(),
            "{d:?}"
        );
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        assert_eq!(c.s.conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(c.get("a.test", "/").unwrap().status, 200);
    }
}

#[test]
fn second_connection_resumes_the_session() {
    // (listener settings, resumption expected): tickets and the session cache each resume
    // on their own (TLS 1.3 without tickets keeps its sessions in the cache); neither: none.
    let cases = [
        ("", true),
        (", session_tickets = false", true),
        (", session_cache = 0", true),
        (", session_cache = 0, session_tickets = false", false),
    ];
    for d in DRIVERS {
        for (extra, resumes) in cases {
            let up = Upstream::echo();
            let gw = TestGateway::start(&tls_gateway(up.addr, extra, ALL), d);
            for versions in [TLS12_ONLY, TLS13_ONLY] {
                // One client config: its session store carries the session to the next
                // connection.
                let cfg = client_config(ClientOpts {
                    versions: Some(versions),
                    ..ClientOpts::default()
                });
                let mut first = TlsClient::connect(gw.addr, "a.test", cfg.clone()).unwrap();
                assert_eq!(first.s.conn.handshake_kind(), Some(HandshakeKind::Full));
                // Reading a response also takes in the TLS 1.3 tickets sent after the
                // handshake.
                assert_eq!(first.get("a.test", "/").unwrap().status, 200);
                let mut second = TlsClient::connect(gw.addr, "a.test", cfg).unwrap();
                let want = if resumes {
                    HandshakeKind::Resumed
                } else {
                    HandshakeKind::Full
                };
                assert_eq!(
                    second.s.conn.handshake_kind(),
                    Some(want),
                    "{d:?} {:?} listener{extra}",
                    versions[0].version
                );
                assert_eq!(second.get("a.test", "/").unwrap().status, 200);
            }
        }
    }
}

/// A reload that leaves a TLS listener's settings and files as they were keeps its session
/// cache and ticket keys (RFC 8446 §2.2: resumption saves the full handshake), so clients
/// resume across it; one that changes them starts afresh, so no session resumes past a
/// changed policy.
#[test]
fn sessions_resume_across_a_reload_that_leaves_the_listener_as_it_was() {
    let up = Upstream::echo();
    let text = tls_gateway(up.addr, "", ALL);
    let gw = TestGateway::start(&text, ringway::config::DriverChoice::Auto);
    let parse = |t: &str| ringway::config::Config::parse(t, "tls.toml").expect("valid config");
    // The first reload builds anew (what the files held when the gateway started is not
    // known); from then on an unchanged listener keeps its config.
    gw.gateway().reload(parse(&text)).expect("reloads");
    for versions in [TLS12_ONLY, TLS13_ONLY] {
        let cfg = client_config(ClientOpts {
            versions: Some(versions),
            ..ClientOpts::default()
        });
        let kind = |cfg: &Arc<rustls::ClientConfig>| {
            let mut c = TlsClient::connect(gw.addr, "a.test", cfg.clone()).unwrap();
            assert_eq!(c.get("a.test", "/").unwrap().status, 200);
            c.s.conn.handshake_kind()
        };
        assert_eq!(kind(&cfg), Some(HandshakeKind::Full));
        gw.gateway()
            .reload(parse(&format!("# only a comment changed\n{text}")))
            .expect("reloads");
        assert_eq!(
            kind(&cfg),
            Some(HandshakeKind::Resumed),
            "{:?}",
            versions[0].version
        );
        // A changed setting: a new config, new keys, a full handshake.
        let changed = tls_gateway(up.addr, ", session_cache = 100", ALL);
        gw.gateway().reload(parse(&changed)).expect("reloads");
        assert_eq!(
            kind(&cfg),
            Some(HandshakeKind::Full),
            "{:?}",
            versions[0].version
        );
        gw.gateway().reload(parse(&text)).expect("reloads");
        kind(&cfg);
    }
}

#[test]
fn plain_http_on_a_tls_port_is_closed() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        // At most a TLS alert, then the end of the stream (not a read timeout).
        let mut got = Vec::new();
        let end = loop {
            let mut tmp = [0u8; 1024];
            match s.read(&mut tmp) {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break Ok(()),
                Err(e) => break Err(e),
            }
            assert!(got.len() < 1024, "{d:?}: unexpected data {got:?}");
        };
        assert!(
            end.is_ok(),
            "{d:?}: the gateway left the connection open: {end:?}"
        );
        assert!(!got.starts_with(b"HTTP/"), "{d:?}: {got:?}");
        // The listener still works.
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        assert_eq!(c.get("a.test", "/").unwrap().status, 200);
    }
}

#[test]
fn a_stalled_handshake_is_closed_at_the_head_timeout() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let toml = tls_gateway(
            up.addr,
            "",
            &format!("{ALL}\n[timeouts]\nclient_head = \"300ms\"\n"),
        );
        let gw = TestGateway::start(&toml, d);
        // Silent, and half a ClientHello record: both are closed by the gateway (EOF before
        // the client's 10 s read timeout), without an answer.
        for first in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00][..]] {
            let mut s = TcpStream::connect(gw.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(first).unwrap();
            let mut tmp = [0u8; 64];
            match s.read(&mut tmp) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!("{d:?}: expected a close, got {other:?}"),
            }
        }
        // The worker was not held up meanwhile.
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        assert_eq!(c.get("a.test", "/").unwrap().status, 200);
    }
}

#[test]
fn graceful_shutdown_finishes_a_tls_request_in_flight() {
    for d in DRIVERS {
        let up = Upstream::slow(Duration::from_millis(300), b"late");
        let mut gw = TestGateway::start(&tls_gateway(up.addr, "", ALL), d);
        let mut c =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        c.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
        assert!(eventually(Duration::from_secs(5), || up.hits() == 1));
        gw.begin_shutdown();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{d:?}");
        assert_eq!(r.body, b"late");
        assert_eq!(r.header("connection"), Some("close"), "{d:?}");
        gw.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Client certificates.

#[test]
fn mtls_required_refuses_missing_and_foreign_certificates() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, &mtls("required"), ALL), d);
        for (who, alert) in [
            (None, "CertificateRequired"),
            (Some("stranger"), "UnknownCA"),
        ] {
            let cfg = client_config(ClientOpts {
                cert: who,
                ..ClientOpts::default()
            });
            // TLS 1.3: the client may finish its side before the server refuses; the refusal
            // then arrives instead of a response.
            let outcome =
                TlsClient::connect(gw.addr, "a.test", cfg).and_then(|mut c| c.get("a.test", "/"));
            let e = format!("{:?}", outcome.expect_err("refused"));
            assert!(e.contains(alert), "{d:?} {who:?}: {e}");
        }
        assert_eq!(up.hits(), 0, "{d:?}");
    }
}

#[test]
fn mtls_subject_reaches_upstream_and_spoofed_copies_are_dropped() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, &mtls("required"), ALL), d);
        let cfg = client_config(ClientOpts {
            cert: Some("client"),
            ..ClientOpts::default()
        });
        let mut c = TlsClient::connect(gw.addr, "a.test", cfg).unwrap();
        c.send(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Client-Cert-Subject: CN=admin\r\nx-client-cert-subject: CN=root\r\n\r\n")
            .unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        let subj = seen(&r, "x-client-cert-subject");
        assert_eq!(subj.len(), 1, "{d:?}: {subj:?}");
        assert!(subj[0].contains("CN=client one"), "{d:?}: {subj:?}");
        assert!(subj[0].contains("O=Ringway Tests"), "{d:?}: {subj:?}");
    }
}

/// The subject header is an RFC 4514 string (§2.1: the last RDN first; §2.4: `,` `+` `"` `\`
/// `<` `>` `;`, a leading `#`, spaces at the ends escaped), so a CN holding `, O=Admin`
/// cannot read as an O of its own (review r4 D3).
#[test]
fn rfc4514_subject_header_is_escaped_and_last_rdn_first() {
    let mut forged = rcgen::DistinguishedName::new();
    forged.push(rcgen::DnType::OrganizationName, "Example");
    forged.push(rcgen::DnType::CommonName, "mallory, O=Admin");
    client_cert_with("client-forged", forged, None);
    let mut odd = rcgen::DistinguishedName::new();
    odd.push(rcgen::DnType::CountryName, "NZ");
    odd.push(rcgen::DnType::OrganizationalUnitName, "#ops ");
    odd.push(rcgen::DnType::CommonName, r#"a+b\c"d;e<f>g=h%i"#);
    client_cert_with("client-odd", odd, None);
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, &mtls("required"), ALL), d);
        for (stem, want) in [
            ("client-forged", r"CN=mallory\, O=Admin,O=Example"),
            (
                "client-odd",
                r#"CN=a\+b\\c\"d\;e\<f\>g=h%25i,OU=\#ops\20,C=NZ"#,
            ),
            ("client", "O=Ringway Tests,CN=client one"),
        ] {
            let cfg = client_config(ClientOpts {
                cert: Some(stem),
                ..ClientOpts::default()
            });
            let mut c = TlsClient::connect(gw.addr, "a.test", cfg).unwrap();
            let r = c.get("a.test", "/").unwrap();
            assert_eq!(r.status, 200, "{d:?} {stem}");
            assert_eq!(seen(&r, "x-client-cert-subject"), [want], "{d:?} {stem}");
        }
    }
}

/// Every verified certificate gets a subject header of its own (review r4 D4): strings of
/// every type are decoded (a Latin-1 TeletexString, a BMPString, a UniversalString; RFC 4514
/// §2.4 wants UTF-8 text), one that does not decode is `#` and the hex of its DER (§2.4),
/// and a long subject is sent whole, never cut to a prefix another certificate shares; one
/// over the bound is refused at the handshake.
#[test]
fn rfc4514_subject_header_decodes_every_string_type_and_is_never_cut() {
    use rcgen::string::{BmpString, TeletexString, UniversalString};
    use rcgen::{DistinguishedName, DnType, DnValue};
    let one = |v: DnValue| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Example");
        dn.push(DnType::CommonName, v);
        dn
    };
    // rcgen writes T.61 as ASCII only: the X becomes 0xE9 (Latin-1 é), signed again.
    for (stem, who) in [("t61-alice", "alice"), ("t61-bob", "bob")] {
        let text = format!("cafX {who}");
        let dn = one(DnValue::TeletexString(
            TeletexString::try_from(text.as_str()).unwrap(),
        ));
        let from = [&[0x14, text.len() as u8][..], text.as_bytes()].concat();
        let to: Vec<u8> = from
            .iter()
            .map(|b| if *b == b'X' { 0xe9 } else { *b })
            .collect();
        client_cert_with(stem, dn, Some((&from, &to)));
    }
    let bmp = DnValue::BmpString(BmpString::try_from("жук").unwrap());
    client_cert_with("bmp", one(bmp), None);
    let univ = DnValue::UniversalString(UniversalString::try_from("𝄞 x").unwrap());
    client_cert_with("universal", one(univ), None);
    // A BMPString holding a lone high surrogate: not text.
    let bad = DnValue::BmpString(BmpString::try_from("ab").unwrap());
    client_cert_with(
        "bmp-bad",
        one(bad),
        Some((&[0x1e, 4, 0, b'a', 0, b'b'], &[0x1e, 4, 0xd8, 0, 0, b'b'])),
    );
    let long = |stem: &'static str, cn: &str, n: usize| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "o".repeat(n));
        dn.push(DnType::OrganizationalUnitName, "u".repeat(n));
        dn.push(DnType::CommonName, cn);
        client_cert_with(stem, dn, None);
    };
    long("long-alice", "alice", 600);
    long("long-admin", "admin", 600);
    long("too-long", "alice", 2100);
    let (o, u) = ("o".repeat(600), "u".repeat(600));
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&tls_gateway(up.addr, &mtls("required"), ALL), d);
        for (stem, want) in [
            ("t61-alice", "CN=caf%C3%A9 alice,O=Example".to_string()),
            ("t61-bob", "CN=caf%C3%A9 bob,O=Example".into()),
            ("bmp", "CN=%D0%B6%D1%83%D0%BA,O=Example".into()),
            ("universal", "CN=%F0%9D%84%9E x,O=Example".into()),
            ("bmp-bad", "CN=#1E04D8000062,O=Example".into()),
            ("long-alice", format!("CN=alice,OU={u},O={o}")),
            ("long-admin", format!("CN=admin,OU={u},O={o}")),
        ] {
            let cfg = client_config(ClientOpts {
                cert: Some(stem),
                ..ClientOpts::default()
            });
            let mut c = TlsClient::connect(gw.addr, "a.test", cfg).unwrap();
            let r = c.get("a.test", "/").unwrap();
            assert_eq!(r.status, 200, "{d:?} {stem}");
            assert_eq!(seen(&r, "x-client-cert-subject"), [want], "{d:?} {stem}");
        }
        let cfg = client_config(ClientOpts {
            cert: Some("too-long"),
            ..ClientOpts::default()
        });
        let outcome =
            TlsClient::connect(gw.addr, "a.test", cfg).and_then(|mut c| c.get("a.test", "/"));
        let e = format!("{:?}", outcome.expect_err("refused"));
        assert!(e.contains("AccessDenied"), "{d:?}: {e}");
        assert_eq!(up.hits(), 7, "{d:?}");
    }
}

/// A cache route behind client certificates (review r4 D2). RFC 9111 §4.1: Vary on the
/// subject header selects by the subject sent upstream (the client's own copy is removed);
/// and, as on routes with an auth policy, a response that is not `public` is stored per
/// certificate subject, so one certificate's answer never reaches another.
#[test]
fn rfc9111_4_1_cache_keys_and_vary_follow_the_client_certificate_subject() {
    let mut two = rcgen::DistinguishedName::new();
    two.push(rcgen::DnType::CommonName, "client two");
    client_cert_with("client-two", two, None);
    for d in DRIVERS {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let up = Upstream::start(move |req| {
            let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
            let who = req.header("x-client-cert-subject").unwrap_or("-");
            let body = format!("{i} for {who}");
            let extra = match req.target.as_str() {
                "/vary" => "cache-control: public, max-age=60\r\nvary: x-client-cert-subject\r\n",
                "/public" => "cache-control: public, max-age=60\r\n",
                _ => "cache-control: max-age=60\r\n",
            };
            Reply::Raw(
                format!(
                    "HTTP/1.1 200 OK\r\n{extra}content-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        });
        let routes = "[[routes]]\nupstream = \"up\"\nrequire_client_cert = true\ncache = { enabled = true }\n";
        let gw = TestGateway::start(&tls_gateway(up.addr, &mtls("required"), routes), d);
        let conn = |stem: &'static str| {
            let cfg = client_config(ClientOpts {
                cert: Some(stem),
                ..ClientOpts::default()
            });
            TlsClient::connect(gw.addr, "a.test", cfg).unwrap()
        };
        let (mut one, mut two) = (conn("client"), conn("client-two"));
        let get = |c: &mut TlsClient, path: &str, extra: &str| {
            c.send(format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n{extra}\r\n").as_bytes())
                .unwrap();
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{d:?} {path}");
            r.text()
        };
        let (s1, s2) = ("O=Ringway Tests,CN=client one", "CN=client two");
        for path in ["/vary", "/plain"] {
            let first = get(&mut one, path, "");
            assert!(
                first.ends_with(&format!("for {s1}")),
                "{d:?} {path}: {first}"
            );
            // The other certificate, with and without a spoofed copy of the first's subject.
            let other = get(&mut two, path, &format!("x-client-cert-subject: {s1}\r\n"));
            assert!(
                other.ends_with(&format!("for {s2}")),
                "{d:?} {path}: {other}"
            );
            assert_eq!(get(&mut two, path, ""), other, "{d:?} {path}");
            assert_eq!(get(&mut one, path, ""), first, "{d:?} {path}");
        }
        // Public, no Vary: one entry for everyone.
        let shared = get(&mut one, "/public", "");
        assert_eq!(get(&mut two, "/public", ""), shared, "{d:?}");
        assert_eq!(n.load(Ordering::SeqCst), 5, "{d:?}");
    }
}

#[test]
fn optional_mtls_with_a_route_that_requires_a_certificate() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let routes = "[[routes]]\npath_prefix = \"/admin\"\nupstream = \"up\"\nrequire_client_cert = true\n\n[[routes]]\nupstream = \"up\"\n";
        let toml = format!(
            "{}\n[[listeners]]\naddress = \"127.0.0.1:0\"\n",
            tls_gateway(up.addr, &mtls("optional"), routes)
        );
        let gw = TestGateway::start(&toml, d);
        let plain_addr = gw.addrs()[1];
        let mut anon =
            TlsClient::connect(gw.addr, "a.test", client_config(ClientOpts::default())).unwrap();
        let r = anon.get("a.test", "/admin/x").unwrap();
        assert_eq!(r.status, 403, "{d:?}");
        assert_eq!(r.json()["error"], "client_certificate_required");
        // Same connection, open route: passes, and a spoofed subject is dropped.
        anon.send(b"GET /open HTTP/1.1\r\nHost: a.test\r\nX-Client-Cert-Subject: CN=admin\r\n\r\n")
            .unwrap();
        let r = anon.read_response().unwrap();
        assert_eq!(r.status, 200, "{d:?}");
        assert!(seen(&r, "x-client-cert-subject").is_empty(), "{d:?}");
        let mut known = TlsClient::connect(
            gw.addr,
            "a.test",
            client_config(ClientOpts {
                cert: Some("client"),
                ..ClientOpts::default()
            }),
        )
        .unwrap();
        let r = known.get("a.test", "/admin/x").unwrap();
        assert_eq!(r.status, 200, "{d:?}");
        assert!(seen(&r, "x-client-cert-subject")[0].contains("CN=client one"));
        // A plain listener of the same gateway: the header is dropped there too, and the
        // route refuses.
        let r = request(
            plain_addr,
            b"GET /open HTTP/1.1\r\nHost: a.test\r\nX-Client-Cert-Subject: CN=admin\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        assert!(seen(&r, "x-client-cert-subject").is_empty(), "{d:?}");
        assert_eq!(get(plain_addr, "/admin").status, 403, "{d:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Redirect.

#[test]
fn plain_listener_redirects_to_https() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let toml = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\nredirect_https = {{ port = 8443 }}\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\nredirect_https = {{}}\n\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n{ALL}",
            up.addr
        );
        let gw = TestGateway::start(&toml, d);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /p/q?x=1&y=2 HTTP/1.1\r\nHost: a.test:8080\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 308, "{d:?}");
        assert_eq!(
            r.header("location"),
            Some("https://a.test:8443/p/q?x=1&y=2")
        );
        // Keep-alive goes on, POST bodies are skipped.
        c.send(b"POST /form HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 3\r\n\r\nabc");
        let r = c.read_response().unwrap();
        assert_eq!(
            r.header("location"),
            Some("https://[::1]:8443/form"),
            "{d:?}"
        );
        let r = get(gw.addrs()[1], "/x");
        assert_eq!(r.header("location"), Some("https://test.local/x"), "{d:?}");
        // No usable host: 400.
        let r = request(gw.addr, b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(r.status, 400, "{d:?}");
        let r = request(gw.addr, b"GET / HTTP/1.1\r\nHost: a\"b\r\n\r\n");
        assert_eq!(r.status, 400, "{d:?}");
        assert_eq!(up.hits(), 0, "nothing is proxied");
    }
}

/// RFC 9112 §3.2.2 and RFC 3986 §6.2.3: the redirect keeps the path and the query of the
/// request-target, in origin form and in absolute form, where an empty path is "/".
#[test]
fn redirect_keeps_path_and_query_of_every_target_form() {
    let cases = [
        ("/p/q?x=1&y=2", "https://a.test:8443/p/q?x=1&y=2"),
        ("/p", "https://a.test:8443/p"),
        ("/", "https://a.test:8443/"),
        ("/?q=1", "https://a.test:8443/?q=1"),
        ("http://abs.test/p?q=1", "https://abs.test:8443/p?q=1"),
        ("http://abs.test/p", "https://abs.test:8443/p"),
        ("http://abs.test?q=1", "https://abs.test:8443/?q=1"),
        ("http://abs.test:81?q=1&r", "https://abs.test:8443/?q=1&r"),
        ("http://abs.test", "https://abs.test:8443/"),
    ];
    for d in DRIVERS {
        let toml = "[[listeners]]\naddress = \"127.0.0.1:0\"\nredirect_https = { port = 8443 }\n\n[[routes]]\ndirect = { status = 200 }\n";
        let gw = TestGateway::start(toml, d);
        let mut c = Client::connect(gw.addr);
        for (target, location) in cases {
            c.send(format!("GET {target} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes());
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 308, "{d:?} {target}");
            assert_eq!(r.header("location"), Some(location), "{d:?} {target}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS to upstreams.

/// A loopback HTTPS upstream that answers with the echo JSON; counts TLS connections.
struct TlsUpstream {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    subjects: Arc<Mutex<Vec<bool>>>,
    /// Connections the gateway ended with a close_notify (a clean end of the TLS stream).
    clean_closes: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TlsUpstream {
    fn start(cert: &str, client_ca: Option<&str>) -> TlsUpstream {
        let b = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let b = match client_ca {
            None => b.with_no_client_auth(),
            Some(ca) => b.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)),
                    provider(),
                )
                .build()
                .unwrap(),
            ),
        };
        let cfg = Arc::new(
            b.with_single_cert(
                certs(&pki().read(&format!("{cert}.pem"))),
                key(&pki().read(&format!("{cert}.key"))),
            )
            .unwrap(),
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let subjects = Arc::new(Mutex::new(Vec::new()));
        let clean_closes = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st, sj, cc) = (
            conns.clone(),
            stop.clone(),
            subjects.clone(),
            clean_closes.clone(),
        );
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((tcp, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (cfg, sj, cc) = (cfg.clone(), sj.clone(), cc.clone());
                thread::spawn(move || tls_upstream_conn(cfg, tcp, &sj, &cc));
            }
        });
        TlsUpstream {
            addr,
            conns,
            subjects,
            clean_closes,
            stop,
        }
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn tls_upstream_conn(
    cfg: Arc<ServerConfig>,
    tcp: TcpStream,
    subjects: &Mutex<Vec<bool>>,
    clean_closes: &AtomicUsize,
) {
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = StreamOwned::new(ServerConnection::new(cfg).unwrap(), tcp);
    let mut buf = Vec::new();
    let mut noted = false;
    // The rest of a record cut in two (`/partial-*`), sent when the next request comes.
    let mut held: Option<Vec<u8>> = None;
    loop {
        let mut tmp = [0u8; 8192];
        let n = match s.read(&mut tmp) {
            // rustls reads a close_notify as the end of the stream, and a TCP close without
            // one as an error (UnexpectedEof).
            Ok(0) => {
                clean_closes.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Err(_) => return,
            Ok(n) => n,
        };
        if !noted {
            subjects
                .lock()
                .unwrap()
                .push(s.conn.peer_certificates().is_some());
            noted = true;
        }
        buf.extend_from_slice(&tmp[..n]);
        while let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..p + 4).collect();
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(&head).unwrap();
            let r = Req {
                method: req.method.unwrap().to_string(),
                target: req.path.unwrap().to_string(),
                version: 1,
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).to_string(),
                        )
                    })
                    .collect(),
                body: Vec::new(),
                raw_head: head.clone(),
            };
            if let Some(rest) = held.take() {
                if s.sock.write_all(&rest).is_err() {
                    return;
                }
            }
            if let Some(cut) = r.target.strip_prefix("/partial-") {
                // A complete response, and in the same TCP write the start of one more record
                // (holding an unasked-for response): 3 bytes of its header, or half of it.
                let mut wire = Vec::new();
                s.conn.writer().write_all(&ok_response(b"first")).unwrap();
                while s.conn.wants_write() {
                    s.conn.write_tls(&mut wire).unwrap();
                }
                s.conn.writer().write_all(SMUGGLED).unwrap();
                let mut next = Vec::new();
                while s.conn.wants_write() {
                    s.conn.write_tls(&mut next).unwrap();
                }
                let at = if cut == "header" { 3 } else { next.len() / 2 };
                wire.extend_from_slice(&next[..at]);
                held = Some(next[at..].to_vec());
                if s.sock.write_all(&wire).is_err() {
                    return;
                }
                continue;
            }
            if r.target == "/garbage" {
                // An application_data record that does not decrypt, then a bare close.
                let _ = s
                    .sock
                    .write_all(b"\x17\x03\x03\x00\x14not-a-sealed-record!");
                return;
            }
            if r.target == "/smuggle" {
                // A complete Content-Length response whose body tail shares one write (so one
                // TLS record) with a second, unasked-for response.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 40000\r\n\r\n");
                let mut tail = vec![b'b'; 40000];
                tail.extend_from_slice(SMUGGLED);
                if s.write_all(&tail).is_err() {
                    return;
                }
                continue;
            }
            if s.write_all(&ok_response(echo_json(&r).as_bytes())).is_err() {
                return;
            }
        }
    }
}

const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nx-smuggled: 1\r\n\r\nPOISONED";

fn upstream_tls_gateway(up: SocketAddr, tls: &str) -> String {
    format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.up]\nendpoints = [{{ address = \"{up}\" }}]\ntls = {{ {tls} }}\n\n{ALL}"
    )
}

#[test]
fn upstream_tls_verifies_against_the_configured_ca() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", None);
        let ok = format!("ca = \"{}\", sni = \"up.test\"", pki().path("ca.pem"));
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &ok), d);
        let mut c = Client::connect(gw.addr);
        for i in 0..3 {
            c.send(format!("GET /s/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes());
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{d:?}: {}", r.text());
            assert_eq!(r.json()["target"], format!("/s/{i}"));
        }
        assert_eq!(
            up.conns.load(Ordering::SeqCst),
            1,
            "{d:?}: pooled TLS connection"
        );
        drop(gw);

        // The wrong CA, or the wrong name: 502 with the gateway's JSON.
        let wrong_ca = format!("ca = \"{}\", sni = \"up.test\"", pki().path("other-ca.pem"));
        let wrong_name = format!("ca = \"{}\", sni = \"nope.test\"", pki().path("ca.pem"));
        for tls in [wrong_ca, wrong_name] {
            let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &tls), d);
            let r = get(gw.addr, "/");
            assert_eq!(r.status, 502, "{d:?} {tls}");
            assert_eq!(r.json()["error"], "upstream_tls_failed", "{d:?}");
        }
        // verify = false accepts the certificate that the wrong CA did not.
        let off = format!(
            "ca = \"{}\", sni = \"up.test\", verify = false",
            pki().path("other-ca.pem")
        );
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &off), d);
        assert_eq!(get(gw.addr, "/").status, 200, "{d:?}");
    }
}

/// RFC 9112 §6.3 (a Content-Length response ends after that many bytes) and §9.3 (a
/// connection is reused only in a known state): bytes an upstream sends past a complete
/// response are never read as the next request's response. Over TLS they sit inside the TLS
/// layer, decrypted or not, where the pool's peek at the raw socket cannot see them.
#[test]
fn tls_upstream_bytes_after_a_complete_response_never_reach_the_next_client() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", None);
        let ok = format!("ca = \"{}\", sni = \"up.test\"", pki().path("ca.pem"));
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &ok), d);
        for i in 0..3 {
            let r = get(gw.addr, "/smuggle");
            assert_eq!(r.status, 200, "{d:?} round {i}");
            assert_eq!(r.body, vec![b'b'; 40000], "{d:?} round {i}");
            // Another client, on another connection.
            answered_as_asked(gw.addr, &format!("/after/{i}"), &format!("{d:?} round {i}"));
        }
        // An honest response still leaves its connection pooled.
        let before = up.conns.load(Ordering::SeqCst);
        for i in 0..3 {
            assert_eq!(get(gw.addr, &format!("/k/{i}")).status, 200, "{d:?}");
        }
        assert!(
            up.conns.load(Ordering::SeqCst) <= before + 1,
            "{d:?}: honest TLS connections are reused"
        );
    }
}

/// A GET of `target` gets the upstream's echo of that very request, not a response the
/// upstream planted on a pooled connection (`x-smuggled`).
fn answered_as_asked(addr: SocketAddr, target: &str, ctx: &str) {
    let r = get(addr, target);
    assert_eq!(
        (r.status, r.header("x-smuggled")),
        (200, None),
        "{ctx}: got {:?}",
        r.text()
    );
    assert_eq!(r.json()["target"], target, "{ctx}");
}

/// RFC 9112 §9.3 (a connection is reused only in a known state), RFC 8446 §5.1 (records):
/// when the bytes an upstream sent past a complete response end inside a TLS record, rustls
/// holds that partial record, which neither a decrypted byte nor a peek at the socket shows.
/// Such a connection is not pooled: reused, the record's rest would complete an unasked-for
/// response and be read as the next request's.
#[test]
fn rfc9112_9_3_a_partial_tls_record_past_a_response_keeps_the_connection_out_of_the_pool() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", None);
        let ok = format!("ca = \"{}\", sni = \"up.test\"", pki().path("ca.pem"));
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &ok), d);
        for cut in ["header", "body"] {
            let r = get(gw.addr, &format!("/partial-{cut}"));
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, &b"first"[..]),
                "{d:?} {cut}"
            );
            answered_as_asked(gw.addr, &format!("/after-{cut}"), &format!("{d:?} {cut}"));
        }
    }
}

#[test]
fn health_checks_of_a_tls_group_go_over_tls() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", None);
        let tls = format!(
            "ca = \"{}\", sni = \"up.test\" }}\nhealth_check = {{ path = \"/healthz\", interval = \"100ms\", unhealthy_threshold = 1",
            pki().path("ca.pem")
        );
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &tls), d);
        // Several checks have run (each on its own TLS connection); a plain-text check would
        // have failed the first and taken the only endpoint out (503).
        assert!(eventually(Duration::from_secs(10), || up
            .conns
            .load(Ordering::SeqCst)
            >= 4));
        let r = get(gw.addr, "/");
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
    }
}

#[test]
fn upstream_tls_presents_the_client_certificate() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", Some("ca.pem"));
        let with_cert = format!(
            "ca = \"{}\", sni = \"up.test\", client_cert = \"{}\", client_key = \"{}\"",
            pki().path("ca.pem"),
            pki().path("client.pem"),
            pki().path("client.key")
        );
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &with_cert), d);
        let r = get(gw.addr, "/");
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_eq!(up.subjects.lock().unwrap().last(), Some(&true));
        drop(gw);
        let without = format!("ca = \"{}\", sni = \"up.test\"", pki().path("ca.pem"));
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &without), d);
        assert_eq!(get(gw.addr, "/").status, 502, "{d:?}");
    }
}

/// RFC 8446 §6.1: a party closing its write side sends close_notify first. The gateway does
/// so for the TLS upstream connections it closes: one not pooled after its response
/// (`max_idle = 0`), and pooled ones closed at shutdown. The upstream reads a clean end of
/// the TLS stream, not a TCP close (which rustls reports as an unexpected EOF).
#[test]
fn rfc8446_6_1_upstream_tls_connections_the_gateway_closes_end_with_close_notify() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", None);
        let tls = format!("ca = \"{}\", sni = \"up.test\"", pki().path("ca.pem"));
        // Not pooled: closed right after each response.
        let unpooled = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\nmax_idle = 0\ntls = {{ {tls} }}\n\n{ALL}",
            up.addr
        );
        let gw = TestGateway::start(&unpooled, d);
        for i in 0..3 {
            let r = get(gw.addr, &format!("/n/{i}"));
            assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        }
        assert!(
            eventually(Duration::from_secs(10), || up
                .clean_closes
                .load(Ordering::SeqCst)
                == 3),
            "{d:?}: {} of 3 connections ended with close_notify",
            up.clean_closes.load(Ordering::SeqCst)
        );
        assert_eq!(up.conns.load(Ordering::SeqCst), 3, "{d:?}");
        drop(gw);
        // Pooled: one connection serves every request, and is closed when the gateway stops.
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &tls), d);
        let mut c = Client::connect(gw.addr);
        for i in 0..3 {
            c.send(format!("GET /p/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes());
            assert_eq!(c.read_response().unwrap().status, 200, "{d:?}");
        }
        assert_eq!(up.conns.load(Ordering::SeqCst), 4, "{d:?}: pooled");
        assert_eq!(
            up.clean_closes.load(Ordering::SeqCst),
            3,
            "{d:?}: still open"
        );
        drop(c);
        drop(gw);
        assert!(
            eventually(Duration::from_secs(10), || up
                .clean_closes
                .load(Ordering::SeqCst)
                == 4),
            "{d:?}: the pooled connection ended without close_notify"
        );
    }
}

/// RFC 8446 §4.4.2.4: a TLS 1.3 server that requires a client certificate sends its refusal
/// (a certificate_required alert) after the client has sent its Finished, so the client meets
/// it on its first read, not in the handshake. That is still a failed TLS handshake: 502
/// `upstream_tls_failed`, counted as such, not `upstream_closed`.
#[test]
fn rfc8446_4_4_2_4_a_tls13_refusal_of_a_missing_client_certificate_is_a_tls_failure() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", Some("ca.pem"));
        let without = format!("ca = \"{}\", sni = \"up.test\"", pki().path("ca.pem"));
        let gw = TestGateway::start(&upstream_tls_gateway(up.addr, &without), d);
        for i in 0..2 {
            let r = get(gw.addr, &format!("/m/{i}"));
            assert_eq!(r.status, 502, "{d:?}: {}", r.text());
            assert_eq!(
                r.json()["error"],
                "upstream_tls_failed",
                "{d:?}: {}",
                r.text()
            );
        }
        let mut text = String::new();
        ringway::metrics::render_prometheus(gw.gateway().control(), &mut text).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("ringway_upstream_errors_total{")
                    && l.contains("kind=\"upstream_tls_failed\"")
                    && l.ends_with(" 2")),
            "{d:?}: {text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.contains("kind=\"upstream_closed\"") && !l.ends_with(" 0")),
            "{d:?}: {text}"
        );
    }
}

/// A TLS failure on the first read of a new connection that is not a refusal of the
/// handshake (here a record that does not decrypt, RFC 8446 §5.2) is answered as a TLS
/// failure too, but retried only as a reset: unlike a refused handshake, the upstream may
/// have read the request, so a POST is not sent again.
#[test]
fn rfc8446_5_2_a_bad_record_before_the_response_is_a_tls_failure_not_retried_for_a_post() {
    for d in DRIVERS {
        let up = TlsUpstream::start("up", None);
        let cfg = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\ntls = {{ ca = \"{}\", sni = \"up.test\" }}\n\n[[routes]]\nupstream = \"up\"\nretry = {{ attempts = 3, on = [\"connect_failure\", \"reset\"] }}\n",
            up.addr,
            pki().path("ca.pem")
        );
        let gw = TestGateway::start(&cfg, d);
        let r = request(
            gw.addr,
            b"POST /garbage HTTP/1.1\r\nHost: a.test\r\ncontent-length: 1\r\n\r\nx",
        );
        assert_eq!(r.status, 502, "{d:?}: {}", r.text());
        assert_eq!(
            r.json()["error"],
            "upstream_tls_failed",
            "{d:?}: {}",
            r.text()
        );
        assert_eq!(up.conns.load(Ordering::SeqCst), 1, "{d:?}: not retried");
    }
}

// ---------------------------------------------------------------------------------------------
// Config refusals.

fn refused(tls: &str) -> ringway::config::ConfigError {
    let src = format!(
        "[[routes]]\ndirect = {{ status = 200 }}\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {tls}\n"
    );
    Config::parse(&src, "tls.toml").expect_err("refused")
}

#[test]
fn bad_certificates_and_keys_are_refused_with_file_key_and_reason() {
    let p = pki();
    let pair =
        |c: &str, k: &str| format!("{{ cert = \"{}\", key = \"{}\" }}", p.path(c), p.path(k));
    let good = pair("a-chain.pem", "a.key");

    let e = refused(&format!(
        "{{ certificates = [{good}, {}] }}",
        pair("wild-chain.pem", "missing.key")
    ));
    assert_eq!(e.key, "listeners[1].tls.certificates[1].key");
    assert!(
        e.reason.contains("missing.key") && e.reason.contains("cannot read"),
        "{e}"
    );
    assert_eq!(e.file, "tls.toml");
    assert_eq!(e.line, Some(9), "{e}");

    let e = refused(&format!(
        "{{ certificates = [{good}, {}] }}",
        pair("wild-chain.pem", "a.key")
    ));
    assert_eq!(e.key, "listeners[1].tls.certificates[1].key");
    assert!(
        e.reason.contains("is not the key of the certificate"),
        "{e}"
    );

    let e = refused(&format!(
        "{{ certificates = [{}] }}",
        pair("a.key", "a.key")
    ));
    assert_eq!(e.key, "listeners[1].tls.certificates[0].cert");
    assert!(e.reason.contains("no CERTIFICATE"), "{e}");

    let e = refused(&format!(
        "{{ certificates = [{}] }}",
        pair("a.pem", "a.pem")
    ));
    assert_eq!(e.key, "listeners[1].tls.certificates[0].key");
    assert!(e.reason.contains("no PRIVATE KEY"), "{e}");

    std::fs::write(
        p.dir.join("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = refused(&format!(
        "{{ certificates = [{}] }}",
        pair("broken.pem", "a.key")
    ));
    assert_eq!(e.key, "listeners[1].tls.certificates[0].cert");
    assert!(e.reason.contains("broken.pem"), "{e}");

    let e = refused("{ certificates = [] }");
    assert_eq!(e.key, "listeners[1].tls.certificates");

    let e = refused(&format!(
        "{{ certificates = [{good}], client_auth = {{ ca = \"{}\" }} }}",
        p.path("nope.pem")
    ));
    assert_eq!(e.key, "listeners[1].tls.client_auth.ca");

    let e = refused(&format!(
        "{{ certificates = [{good}], min_version = \"1.1\" }}"
    ));
    assert!(e.key.starts_with("listeners[1].tls"), "{e}");

    // A route that requires a client certificate where no listener asks for one.
    let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\ndirect = { status = 200 }\nrequire_client_cert = true\n";
    let e = Config::parse(src, "t.toml").unwrap_err();
    assert_eq!(e.key, "routes[0].require_client_cert");

    // Upstream TLS files are checked too.
    let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\ntls = {{ ca = \"{}\" }}\n", p.path("a.key"));
    let e = Config::parse(&src, "t.toml").unwrap_err();
    assert_eq!(e.key, "upstreams.up.tls.ca");
    assert!(e.reason.contains("no CERTIFICATE"), "{e}");
    let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\ntls = {{ client_cert = \"{}\" }}\n", p.path("client.pem"));
    let e = Config::parse(&src, "t.toml").unwrap_err();
    assert_eq!(e.key, "upstreams.up.tls.client_key");
}
