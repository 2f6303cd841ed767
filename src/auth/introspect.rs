//! OAuth2 token introspection (RFC 7662) from the worker, on monoio.
//!
//! For an opaque bearer token the worker POSTs `token=...` to the endpoint with its client
//! credentials (HTTP Basic, RFC 6749 §2.3.1), over a new connection (TLS for https URLs, with
//! the client config built once at start), within `timeout` for the whole exchange: connect,
//! handshake, request and answer. Answers with `active: true` are cached per core (see
//! [`super::WorkerAuth`]) until the token's `exp` or the configured maximum.
//!
//! Each worker runs at most `max_concurrent` calls at once. A request over that bound is not
//! queued: it is answered 503 with `Retry-After: 1` at once, so a slow endpoint cannot pile up
//! waiting requests. A failed or timed-out call is also a 503 (the gateway cannot tell), never a
//! 401, and is not cached; a failed TLS handshake (a certificate that does not verify) is such a
//! failure, logged at debug level.

use std::cell::Cell;
use std::time::Duration;

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio_rustls::TlsConnector;
use rustls::pki_types::ServerName;
use serde_json::{Map, Value};

use super::config::IntrospectionConfig;
use super::jwks::{parse_response, Endpoint, HttpUrl};
use super::AuthFail;
use crate::debug;

/// A checked answer.
pub struct Answer {
    pub claims: Map<String, Value>,
    pub exp: Option<u64>,
}

/// One introspection endpoint as a worker uses it.
pub struct Provider {
    url: HttpUrl,
    /// https: the connector (the shared client config) and the name to verify.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `authorization: Basic ...` line (holds the client secret: never logged).
    basic: String,
    timeout: Duration,
    max_concurrent: usize,
    in_flight: Cell<usize>,
    pub max_ttl: u64,
    pub forward: Vec<(String, Box<[u8]>)>,
    pub consumer_claim: String,
}

/// Decrements the in-flight count however the call ends (cancelled included).
struct Slot<'a>(&'a Cell<usize>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Provider {
    pub fn new(
        cfg: &IntrospectionConfig,
        ep: &Endpoint,
        forward: Vec<(String, Box<[u8]>)>,
    ) -> Provider {
        use base64::Engine;
        let cred = format!(
            "{}:{}",
            form_encode(&cfg.client_id),
            form_encode(&cfg.client_secret.0)
        );
        Provider {
            url: ep.url.clone(),
            tls: ep
                .tls
                .as_ref()
                .map(|(c, name)| (TlsConnector::from(c.clone()), name.clone())),
            basic: format!(
                "authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(cred)
            ),
            timeout: cfg.timeout.0,
            max_concurrent: cfg.max_concurrent,
            in_flight: Cell::new(0),
            max_ttl: cfg.cache_max_ttl.0.as_secs().max(1),
            forward,
            consumer_claim: cfg.consumer_claim.clone(),
        }
    }

    /// Asks the endpoint about `token`. `Err(None)`: no usable answer (503).
    pub async fn call(&self, token: &str) -> Result<Answer, Option<AuthFail>> {
        if self.in_flight.get() >= self.max_concurrent {
            return Err(None);
        }
        self.in_flight.set(self.in_flight.get() + 1);
        let _slot = Slot(&self.in_flight);
        let body = match monoio::time::timeout(self.timeout, self.exchange(token)).await {
            Ok(Some(b)) => b,
            _ => return Err(None),
        };
        let v: Value = serde_json::from_slice(&body).map_err(|_| None)?;
        let Value::Object(claims) = v else {
            return Err(None);
        };
        if claims.get("active") != Some(&Value::Bool(true)) {
            return Err(Some(AuthFail::Inactive));
        }
        let exp = claims.get("exp").and_then(Value::as_u64);
        Ok(Answer { claims, exp })
    }

    /// One POST; the 200 answer's body.
    async fn exchange(&self, token: &str) -> Option<Vec<u8>> {
        let form = format!("token={}&token_type_hint=access_token", form_encode(token));
        let head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\naccept: application/json\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n{}connection: close\r\n\r\n{form}",
            self.url.path,
            self.url.host,
            form.len(),
            self.basic
        );
        let tcp = TcpStream::connect_addr(self.url.addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => talk(tcp, head.into_bytes()).await,
            Some((connector, name)) => match connector.connect(name.clone(), tcp).await {
                Ok(s) => talk(s, head.into_bytes()).await,
                Err(e) => {
                    debug!(
                        "introspection: TLS handshake with {} failed: {e}",
                        self.url.host
                    );
                    None
                }
            },
        }
    }
}

/// Sends `req` and reads the answer until it is complete; the 200 answer's body.
async fn talk<S: AsyncReadRent + AsyncWriteRent>(mut s: S, req: Vec<u8>) -> Option<Vec<u8>> {
    let (r, _) = s.write_all(req).await;
    r.ok()?;
    s.flush().await.ok()?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if buf.len() > super::jwks::MAX_JWKS_BYTES {
            return None;
        }
        buf.reserve(4096);
        // Read after what is already there (a plain `read(buf)` fills from the start).
        let (len, cap) = (buf.len(), buf.capacity());
        let (r, slice) = s.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        let eof = match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => return None,
        };
        match parse_response(&buf, eof) {
            Ok(Some(f)) if f.status == 200 => return Some(f.body),
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if eof => return None,
            Ok(None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b&c=d+é"), "a%20b%26c%3Dd%2B%C3%A9");
        assert_eq!(form_encode("tok-en._~"), "tok-en._~");
    }
}
