//! `ringway demo`: small sample services on loopback for the demo config to front.
//!
//! They are plain blocking servers (a thread per connection) built on ringway's own request
//! parser, good for trying the gateway by hand, not for measuring it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

use crate::cache::policy::RangeAnswer;
use crate::http::request::{parse_request, BodyKind, Limits, RequestHead};

#[derive(Clone, Copy)]
enum Service {
    Users { instance: u8 },
    Orders,
}

/// Starts the sample services the demo config expects: users on 127.0.0.1:9101 and :9102,
/// orders on 127.0.0.1:9103.
pub fn start_sample_services() -> io::Result<()> {
    spawn_service(
        "127.0.0.1:9101".parse().expect("literal"),
        Service::Users { instance: 1 },
    )?;
    spawn_service(
        "127.0.0.1:9102".parse().expect("literal"),
        Service::Users { instance: 2 },
    )?;
    spawn_service("127.0.0.1:9103".parse().expect("literal"), Service::Orders)?;
    Ok(())
}

fn spawn_service(addr: SocketAddr, svc: Service) -> io::Result<()> {
    let l = TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("sample service on {addr}: {e}")))?;
    serve_on(l, svc)
}

/// Serves `svc` on `l`, a thread per connection.
fn serve_on(l: TcpListener, svc: Service) -> io::Result<()> {
    let port = l.local_addr()?.port();
    thread::Builder::new()
        .name(format!("demo-{port}"))
        .spawn(move || {
            for s in l.incoming().flatten() {
                let _ = thread::Builder::new().spawn(move || serve_conn(s, svc));
            }
        })?;
    Ok(())
}

fn serve_conn(mut s: TcpStream, svc: Service) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut head = RequestHead::default();
    let limits = Limits::default();
    loop {
        let n = loop {
            match parse_request(&buf, &limits, &mut head) {
                Ok(Some(n)) => break n,
                Ok(None) => {}
                Err(_) => return,
            }
            let mut tmp = [0u8; 4096];
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
            }
        };
        head.raw = bytes::Bytes::copy_from_slice(&buf[..n]);
        buf.drain(..n);
        let body_len = match head.body {
            BodyKind::Length(l) => l as usize,
            BodyKind::None => 0,
            BodyKind::Chunked => return,
        };
        while buf.len() < body_len {
            let mut tmp = [0u8; 4096];
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
            }
        }
        let body: Vec<u8> = buf.drain(..body_len).collect();
        // HEAD is answered as GET would be, without the content (RFC 9110 §9.3.2; §9.1: a
        // general-purpose server supports both). Before, it fell to 404, and `curl -I` on the
        // demo's cached route showed the sample service's 404 until a GET had been stored.
        let is_head = head.method_str() == b"HEAD";
        let method = if is_head {
            &b"GET"[..]
        } else {
            head.method_str()
        };
        let (mut status, mut json) = answer(svc, method, head.path_bytes(), &body);
        if let Some(user) = user_filter(svc, method, head.bytes(head.path_query)) {
            (status, json) = (200, orders_of(user));
        }
        let freshness = freshness(svc, method, status);
        // A users answer names its bytes (a strong ETag) and serves a single byte range of
        // them (RFC 9110 §14): the demo's cached route stores such a 206 as a piece and
        // answers the ranges inside it (README "Caching", Pieces).
        let mut extra = String::new();
        let mut body = json.as_bytes();
        if !freshness.is_empty() {
            extra = format!("etag: \"{:016x}\"\r\naccept-ranges: bytes\r\n", fnv1a(body));
            // (Ranges are GET's only, RFC 9110 §14.2: a HEAD's `Range` is ignored.)
            let mut ranges = head.header_values(b"range").filter(|_| !is_head);
            if let (Some(r), None) = (ranges.next(), ranges.next()) {
                let len = body.len() as u64;
                match crate::cache::policy::byte_range(r, len) {
                    RangeAnswer::Part(a, b) => {
                        status = 206;
                        extra.push_str(&format!("content-range: bytes {a}-{b}/{len}\r\n"));
                        // (`a <= b < len`: `byte_range` checked it; no slice that could
                        // panic all the same, the gateway runs in this process.)
                        body = usize::try_from(a)
                            .ok()
                            .zip(usize::try_from(b).ok())
                            .and_then(|(a, b)| body.get(a..=b))
                            .unwrap_or_default();
                    }
                    RangeAnswer::Unsatisfiable => {
                        status = 416;
                        extra.push_str(&format!("content-range: bytes */{len}\r\n"));
                        body = b"";
                    }
                    RangeAnswer::Full => {}
                }
            }
        }
        let reason = crate::http::encode::reason_phrase(status);
        let mut resp = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{freshness}{extra}content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if !is_head {
            resp.extend_from_slice(body);
        }
        if s.write_all(&resp).is_err() || !head.keep_alive {
            return;
        }
    }
}

/// The 64-bit FNV-1a hash of `b`: a users answer's entity tag.
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How long a users answer may be served from a cache (RFC 9111 §5.2.2.1): 30 s, so that the
/// demo's cached route shows a miss, then hits with a `ttl`, then (past 30 s) a stale answer
/// served while it is revalidated in the background. Without it the answers would be stored
/// already stale, and every hit would revalidate. Orders and errors say nothing.
fn freshness(svc: Service, method: &[u8], status: u16) -> &'static str {
    match svc {
        Service::Users { .. } if method == b"GET" && status == 200 => {
            "cache-control: max-age=30\r\n"
        }
        _ => "",
    }
}

const USERS: &[(u32, &str, &str)] = &[
    (1, "Ada Lovelace", "ada@example.com"),
    (2, "Grace Hopper", "grace@example.com"),
    (3, "Edsger Dijkstra", "edsger@example.com"),
];

const ORDERS: &[(u32, u32, &str, u32)] = &[
    (100, 1, "analytical engine", 1),
    (101, 2, "compiler", 2),
    (102, 1, "punch cards", 500),
];

fn user_json(u: &(u32, &str, &str)) -> String {
    serde_json::json!({"id": u.0, "name": u.1, "email": u.2}).to_string()
}

fn order_json(o: &(u32, u32, &str, u32)) -> String {
    serde_json::json!({"id": o.0, "user_id": o.1, "item": o.2, "quantity": o.3}).to_string()
}

/// `GET /orders?user_id=N` on the orders service: the user id to filter by.
fn user_filter(svc: Service, method: &[u8], path_query: &[u8]) -> Option<u32> {
    if !matches!(svc, Service::Orders) || method != b"GET" {
        return None;
    }
    let pq = std::str::from_utf8(path_query).ok()?;
    let (path, query) = pq.split_once('?')?;
    if path.trim_end_matches('/') != "/orders" {
        return None;
    }
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("user_id="))
        .and_then(|v| v.parse().ok())
}

/// The orders of one user, as `GET /orders` answers them.
fn orders_of(user: u32) -> String {
    let list: Vec<serde_json::Value> = ORDERS
        .iter()
        .filter(|o| o.1 == user)
        .map(|o| serde_json::json!({"id": o.0, "user_id": o.1, "item": o.2, "quantity": o.3}))
        .collect();
    serde_json::json!({ "orders": list }).to_string()
}

fn answer(svc: Service, method: &[u8], path: &[u8], body: &[u8]) -> (u16, String) {
    let path = std::str::from_utf8(path).unwrap_or("");
    let not_found = || (404, r#"{"error":"not found"}"#.to_string());
    match svc {
        Service::Users { instance } => {
            let served_by = format!("users-{instance}");
            match (method, path.trim_end_matches('/')) {
                (b"GET", "/users") => {
                    let list: Vec<serde_json::Value> = USERS
                        .iter()
                        .map(|u| serde_json::from_str(&user_json(u)).expect("valid json"))
                        .collect();
                    (
                        200,
                        serde_json::json!({"users": list, "served_by": served_by}).to_string(),
                    )
                }
                (b"GET", p) => match p
                    .strip_prefix("/users/")
                    .and_then(|id| id.parse::<u32>().ok())
                {
                    Some(id) => match USERS.iter().find(|u| u.0 == id) {
                        Some(u) => (200, user_json(u)),
                        None => not_found(),
                    },
                    None => not_found(),
                },
                _ => not_found(),
            }
        }
        Service::Orders => match (method, path.trim_end_matches('/')) {
            (b"GET", "/orders") => {
                let list: Vec<serde_json::Value> = ORDERS
                    .iter()
                    .map(|o| serde_json::from_str(&order_json(o)).expect("valid json"))
                    .collect();
                (200, serde_json::json!({"orders": list}).to_string())
            }
            (b"POST", "/orders") => match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(v) => (
                    201,
                    serde_json::json!({"created": v, "id": 103}).to_string(),
                ),
                Err(e) => (400, serde_json::json!({"error": e.to_string()}).to_string()),
            },
            (b"GET", p) => match p
                .strip_prefix("/orders/")
                .and_then(|id| id.parse::<u32>().ok())
            {
                Some(id) => match ORDERS.iter().find(|o| o.0 == id) {
                    Some(o) => (200, order_json(o)),
                    None => not_found(),
                },
                None => not_found(),
            },
            _ => not_found(),
        },
    }
}

/// The lines `ringway demo` prints about the admin API, when the config enables it.
pub fn admin_hints(cfg: &crate::config::Config) -> String {
    let Some(a) = cfg.admin.as_ref().filter(|a| a.enabled) else {
        return String::new();
    };
    let addr = a.address.addr;
    format!(
        "admin API on http://{addr} (loopback only):\n\
         \x20 curl -s http://{addr}/upstreams          # every endpoint: health, ejection, in flight, idle pool\n\
         \x20 curl -s http://{addr}/metrics            # Prometheus metrics\n\
         \x20 curl -s -H 'Accept: application/openmetrics-text' http://{addr}/metrics   # the same as OpenMetrics\n\
         \x20 curl -s http://{addr}/routes\n\
         \x20 curl -i http://{addr}/ready\n\
         \x20 ringway status --admin {addr}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request to a sample service on a port from the kernel; the whole answer.
    fn answer_of(svc: Service, req: &str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        serve_on(l, svc).expect("serve");
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(req.as_bytes()).expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read");
        String::from_utf8(out).expect("utf-8")
    }

    /// [`answer_of`]'s head, lower case.
    fn head_of(svc: Service, req: &str) -> String {
        answer_of(svc, req)
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    }

    #[test]
    fn users_answers_carry_a_freshness_lifetime_and_the_rest_none() {
        let users = Service::Users { instance: 1 };
        let close = "Host: x\r\nConnection: close\r\n\r\n";
        let h = head_of(users, &format!("GET /users/1 HTTP/1.1\r\n{close}"));
        assert!(h.starts_with("http/1.1 200"), "{h}");
        assert!(h.contains("\r\ncache-control: max-age=30\r\n"), "{h}");
        let h = head_of(users, &format!("GET /users/99 HTTP/1.1\r\n{close}"));
        assert!(
            h.starts_with("http/1.1 404") && !h.contains("cache-control"),
            "{h}"
        );
        let h = head_of(Service::Orders, &format!("GET /orders HTTP/1.1\r\n{close}"));
        assert!(
            h.starts_with("http/1.1 200") && !h.contains("cache-control"),
            "{h}"
        );
    }

    #[test]
    fn users_answers_serve_a_single_byte_range_with_a_strong_etag_rfc9110_14() {
        let users = Service::Users { instance: 1 };
        let close = "Host: x\r\nConnection: close\r\n";
        let whole = answer_of(users, &format!("GET /users/1 HTTP/1.1\r\n{close}\r\n"));
        assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
        let (head, body) = whole.split_once("\r\n\r\n").expect("head");
        let etag = head
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .expect("an etag");
        assert!(etag.starts_with('"') && etag.len() == 18, "{etag}");
        let part = answer_of(
            users,
            &format!("GET /users/1 HTTP/1.1\r\n{close}Range: bytes=2-9\r\n\r\n"),
        );
        assert!(part.starts_with("HTTP/1.1 206"), "{part}");
        let (phead, pbody) = part.split_once("\r\n\r\n").expect("head");
        let range = format!("\r\ncontent-range: bytes 2-9/{}\r\n", body.len());
        assert!(phead.contains(&range), "{phead}");
        assert!(phead.contains(&format!("\r\netag: {etag}\r\n")), "{phead}");
        assert_eq!(pbody, &body[2..=9]);
        let past = answer_of(
            users,
            &format!("GET /users/1 HTTP/1.1\r\n{close}Range: bytes=9999-\r\n\r\n"),
        );
        assert!(past.starts_with("HTTP/1.1 416"), "{past}");
        assert!(past.contains(&format!("content-range: bytes */{}\r\n", body.len())));
        // Orders name no bytes and serve no range.
        let o = answer_of(
            Service::Orders,
            &format!("GET /orders HTTP/1.1\r\n{close}Range: bytes=0-1\r\n\r\n"),
        );
        assert!(o.starts_with("HTTP/1.1 200") && !o.contains("etag"), "{o}");
    }

    /// RFC 9110 §9.3.2 (and §9.1: a general-purpose server supports GET and HEAD): a HEAD
    /// gets the head a GET would, its `Content-Length` and `ETag` included, and no content.
    /// Before, every sample service answered HEAD with 404.
    #[test]
    fn a_head_gets_the_get_s_head_without_content_rfc9110_9_3_2() {
        let close = "Host: x\r\nConnection: close\r\n\r\n";
        for (svc, path) in [
            (Service::Users { instance: 1 }, "/users/1"),
            (Service::Users { instance: 2 }, "/users"),
            (Service::Orders, "/orders"),
            (Service::Orders, "/orders?user_id=1"),
        ] {
            let get = answer_of(svc, &format!("GET {path} HTTP/1.1\r\n{close}"));
            let head = answer_of(svc, &format!("HEAD {path} HTTP/1.1\r\n{close}"));
            let (get_head, get_body) = get.split_once("\r\n\r\n").expect("a head");
            assert!(get_head.starts_with("HTTP/1.1 200"), "{get}");
            assert!(!get_body.is_empty(), "{get}");
            assert_eq!(head, format!("{get_head}\r\n\r\n"), "HEAD {path}");
        }
        // A HEAD's `Range` is ignored (RFC 9110 §14.2: range handling is GET's alone).
        let users = Service::Users { instance: 1 };
        let get = answer_of(users, &format!("GET /users/1 HTTP/1.1\r\n{close}"));
        let head = answer_of(
            users,
            "HEAD /users/1 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nConnection: close\r\n\r\n",
        );
        let get_head = get.split("\r\n\r\n").next().unwrap_or_default();
        assert_eq!(head, format!("{get_head}\r\n\r\n"));
    }
}
