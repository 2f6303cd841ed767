//! Gateway-made errors and the one function that turns them into a response.

use bytes::{BufMut, BytesMut};

use crate::auth::AuthFail;
use crate::http::chunked::ChunkError;
use crate::http::encode::{put_status_line, put_u64, reason_phrase};
use crate::http::request::ParseError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayError {
    /// The request head was refused.
    Parse(ParseError),
    /// A chunked request body was malformed.
    BadChunk(ChunkError),
    /// No route matches.
    NoRoute,
    /// The request body is over the route's `max_body_bytes`.
    BodyTooLarge,
    /// The client was too slow sending its head or body.
    ClientTimeout,
    /// The upstream refused or reset the connection attempt.
    UpstreamConnect,
    /// The TCP connect did not finish within `upstream_connect`.
    UpstreamConnectTimeout,
    /// No response head within `upstream_response`.
    UpstreamTimeout,
    /// The upstream sent something that is not a valid HTTP/1.1 response.
    UpstreamBadResponse,
    /// The upstream closed or reset the connection before a complete response head.
    UpstreamClosed,
    /// Every endpoint of the upstream is out (health checks or outlier ejection).
    NoHealthyEndpoint,
    /// The upstream's circuit breaker is open; retry after this many seconds.
    CircuitOpen(u32),
    /// The upstream's concurrency limits are reached.
    Overloaded,
    /// A rate limit of the route refused the request; retry after this many seconds.
    RateLimited(u32),
    /// The route's concurrency limit is reached.
    ConcurrencyLimited,
    /// A limit kept in Redis could not be checked and the policy is to fail closed.
    RateLimitUnavailable,
    /// The TLS handshake with the upstream failed (certificate not trusted, name mismatch,
    /// protocol error).
    UpstreamTls,
    /// The route requires a verified client certificate and the connection has none.
    ClientCertRequired,
    /// Credentials missing or refused (401, with a `WWW-Authenticate` challenge).
    Unauthorized(AuthFail),
    /// Authenticated, but a required scope or role is missing (403).
    Forbidden,
    /// The credential could not be checked: the introspection endpoint failed or is busy.
    AuthUnavailable,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::Parse(p) => p.status(),
            GatewayError::BadChunk(_) => 400,
            GatewayError::NoRoute => 404,
            GatewayError::BodyTooLarge => 413,
            GatewayError::ClientTimeout => 408,
            GatewayError::UpstreamConnect => 502,
            GatewayError::UpstreamConnectTimeout => 504,
            GatewayError::UpstreamTimeout => 504,
            GatewayError::UpstreamBadResponse => 502,
            GatewayError::UpstreamClosed => 502,
            GatewayError::NoHealthyEndpoint
            | GatewayError::CircuitOpen(_)
            | GatewayError::Overloaded => 503,
            GatewayError::RateLimited(_) => 429,
            GatewayError::ConcurrencyLimited | GatewayError::RateLimitUnavailable => 503,
            GatewayError::UpstreamTls => 502,
            GatewayError::ClientCertRequired => 403,
            GatewayError::Unauthorized(_) => 401,
            GatewayError::Forbidden => 403,
            GatewayError::AuthUnavailable => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::Parse(ParseError::UriTooLong) => "uri_too_long",
            GatewayError::Parse(ParseError::HeadTooLarge) => "header_too_large",
            GatewayError::Parse(ParseError::NotImplemented(_)) => "not_implemented",
            GatewayError::Parse(ParseError::Expectation) => "expectation_failed",
            GatewayError::Parse(ParseError::Version) => "version_not_supported",
            GatewayError::Parse(ParseError::MethodNotAllowed) => "method_not_allowed",
            GatewayError::Parse(ParseError::Bad(_)) | GatewayError::BadChunk(_) => "bad_request",
            GatewayError::NoRoute => "no_route",
            GatewayError::BodyTooLarge => "body_too_large",
            GatewayError::ClientTimeout => "request_timeout",
            GatewayError::UpstreamConnect => "upstream_connect_failed",
            GatewayError::UpstreamConnectTimeout => "upstream_connect_timeout",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamBadResponse => "upstream_bad_response",
            GatewayError::UpstreamClosed => "upstream_closed",
            GatewayError::NoHealthyEndpoint => "no_healthy_endpoint",
            GatewayError::CircuitOpen(_) => "circuit_open",
            GatewayError::Overloaded => "upstream_overloaded",
            GatewayError::RateLimited(_) => "rate_limited",
            GatewayError::ConcurrencyLimited => "concurrency_limited",
            GatewayError::RateLimitUnavailable => "rate_limit_unavailable",
            GatewayError::UpstreamTls => "upstream_tls_failed",
            GatewayError::ClientCertRequired => "client_certificate_required",
            GatewayError::Unauthorized(AuthFail::Missing) => "unauthorized",
            GatewayError::Unauthorized(_) => "invalid_token",
            GatewayError::Forbidden => "insufficient_scope",
            GatewayError::AuthUnavailable => "auth_unavailable",
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            GatewayError::Parse(p) => p.reason(),
            GatewayError::BadChunk(c) => c.reason(),
            GatewayError::NoRoute => "no route matches this request",
            GatewayError::BodyTooLarge => "request body is larger than this route allows",
            GatewayError::ClientTimeout => "the request was not received in time",
            GatewayError::UpstreamConnect => "could not connect to the upstream",
            GatewayError::UpstreamConnectTimeout => "connecting to the upstream timed out",
            GatewayError::UpstreamTimeout => "the upstream did not answer in time",
            GatewayError::UpstreamBadResponse => "the upstream sent an invalid response",
            GatewayError::UpstreamClosed => "the upstream closed the connection without answering",
            GatewayError::NoHealthyEndpoint => "no healthy endpoint is available for this upstream",
            GatewayError::CircuitOpen(_) => "the upstream's circuit breaker is open",
            GatewayError::Overloaded => "the upstream's concurrency limit is reached",
            GatewayError::RateLimited(_) => {
                "too many requests: a rate limit of this route is reached"
            }
            GatewayError::ConcurrencyLimited => "too many requests of this route are in flight",
            GatewayError::RateLimitUnavailable => {
                "the shared rate-limit store cannot be reached, and this route fails closed"
            }
            GatewayError::UpstreamTls => "the TLS handshake with the upstream failed",
            GatewayError::ClientCertRequired => "this route requires a verified client certificate",
            GatewayError::Unauthorized(f) => f.message(),
            GatewayError::Forbidden => "the credentials lack a scope or role this route requires",
            GatewayError::AuthUnavailable => "the credentials cannot be checked right now",
        }
    }

    /// The `Allow` header value a 405 must carry (RFC 9110 §15.5.6).
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            GatewayError::Parse(p) => p.allow(),
            _ => None,
        }
    }

    /// Seconds for a `Retry-After` header, when the error has one.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            GatewayError::CircuitOpen(s) | GatewayError::RateLimited(s) => Some(*s),
            GatewayError::Overloaded
            | GatewayError::NoHealthyEndpoint
            | GatewayError::ConcurrencyLimited
            | GatewayError::RateLimitUnavailable
            | GatewayError::AuthUnavailable => Some(1),
            _ => None,
        }
    }
}

/// Writes a complete error response: status, a small JSON body naming the error and the
/// request id, and `Connection: close` when the connection ends after it.
pub fn write_error_response(
    buf: &mut BytesMut,
    err: GatewayError,
    request_id: &[u8],
    date: &[u8],
    extra_headers: &[u8],
    close: bool,
) {
    write_error_response_traced(buf, err, request_id, b"", date, extra_headers, close)
}

/// [`write_error_response`] with the request's trace id (W3C trace context, 32 hex digits) in
/// the body as `trace_id`, so that a client can quote it; an empty `trace_id` leaves it out.
pub fn write_error_response_traced(
    buf: &mut BytesMut,
    err: GatewayError,
    request_id: &[u8],
    trace_id: &[u8],
    date: &[u8],
    extra_headers: &[u8],
    close: bool,
) {
    let status = err.status();
    // request ids are checked to hold only token characters and trace ids are hex, so no JSON
    // escaping is needed.
    let mut body = BytesMut::with_capacity(200);
    body.put_slice(b"{\"error\":\"");
    body.put_slice(err.code().as_bytes());
    body.put_slice(b"\",\"status\":");
    put_u64(&mut body, status as u64);
    body.put_slice(b",\"message\":\"");
    body.put_slice(err.message().as_bytes());
    body.put_slice(b"\",\"request_id\":\"");
    body.put_slice(request_id);
    if !trace_id.is_empty() {
        body.put_slice(b"\",\"trace_id\":\"");
        body.put_slice(trace_id);
    }
    body.put_slice(b"\"}\n");
    put_status_line(buf, status, reason_phrase(status).as_bytes());
    buf.put_slice(b"content-type: application/json\r\ncontent-length: ");
    put_u64(buf, body.len() as u64);
    buf.put_slice(b"\r\ndate: ");
    buf.put_slice(date);
    buf.put_slice(b"\r\nx-request-id: ");
    buf.put_slice(request_id);
    if let Some(s) = err.retry_after() {
        buf.put_slice(b"\r\nretry-after: ");
        put_u64(buf, s as u64);
    }
    if let Some(a) = err.allow() {
        buf.put_slice(b"\r\nallow: ");
        buf.put_slice(a.as_bytes());
    }
    buf.put_slice(b"\r\n");
    buf.put_slice(extra_headers);
    if close {
        buf.put_slice(b"connection: close\r\n");
    }
    buf.put_slice(b"\r\n");
    buf.put_slice(&body);
}
