//! A small blocking client for the admin API: what `ringway status` and `ringway drain` use.
//! One request per connection (`Connection: close`), a deadline over the whole exchange, the
//! answer read with the gateway's own response parser and capped in size.

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http::response::{parse_response, RespBody, ResponseHead};

/// Largest answer read: the admin API's JSON stays far below it.
pub const MAX_REPLY_BYTES: usize = 16 << 20;
/// Deadline of one exchange, connect included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// An admin API answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Sends one request and reads the answer. `Err` says what failed, for a person to read.
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Reply, String> {
    let end = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to the admin API at {addr}: {e}"))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: 0\r\n"
    );
    if let Some(t) = token {
        let _ = write!(req, "authorization: Bearer {t}\r\n");
    }
    req.push_str("\r\n");
    let left = end
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
    s.write_all(req.as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{addr} did not answer within {timeout:?}"));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => {
                if buf.len() + n > MAX_REPLY_BYTES {
                    return Err(format!("the answer from {addr} is too large"));
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // A reset after the whole answer arrived still leaves the answer readable.
            Err(_) if !buf.is_empty() => break,
            Err(e) => return Err(format!("reading from {addr}: {e}")),
        }
    }
    let mut head = ResponseHead::default();
    let len = match parse_response(&buf, method == "HEAD", &mut head) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(format!("{addr} closed before a complete answer")),
        Err(e) => return Err(format!("{addr} answered something that is not HTTP: {e:?}")),
    };
    let rest = &buf[len..];
    let body = match head.body {
        RespBody::None => Vec::new(),
        RespBody::Length(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if rest.len() < n {
                return Err(format!("{addr} closed before the whole answer"));
            }
            rest[..n].to_vec()
        }
        RespBody::Close => rest.to_vec(),
        RespBody::Chunked => return Err(format!("{addr} sent a chunked answer")),
    };
    Ok(Reply {
        status: head.status,
        body,
    })
}

fn describe_error(r: &Reply) -> String {
    let msg = r
        .json()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&r.body).trim().to_string());
    match r.status {
        401 => format!("401: {msg} (pass --token, or set RINGWAY_ADMIN_TOKEN)"),
        s => format!("{s}: {msg}"),
    }
}

/// `ringway status`: readiness, then each upstream endpoint's health. Returns the text and
/// whether the gateway is ready.
pub fn status(addr: SocketAddr, token: Option<&str>) -> Result<(String, bool), String> {
    let ready = call(addr, "GET", "/ready", token, TIMEOUT)?;
    let r = ready.json().unwrap_or(Value::Null);
    let is_ready = ready.status == 200;
    let mut out = String::new();
    let state = if is_ready {
        "ready".to_string()
    } else if r.get("shutting_down").and_then(Value::as_bool) == Some(true) {
        "NOT READY (shutting down)".to_string()
    } else if r.get("draining").and_then(Value::as_bool) == Some(true) {
        format!(
            "NOT READY (draining; {} of {} workers stopped accepting)",
            r.get("workers_stopped_accepting")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            r.get("workers").and_then(Value::as_u64).unwrap_or(0)
        )
    } else {
        format!("NOT READY ({})", ready.status)
    };
    let _ = writeln!(out, "ringway at {addr}: {state}");
    let up = call(addr, "GET", "/upstreams", token, TIMEOUT)?;
    if up.status != 200 {
        return Err(format!("/upstreams: {}", describe_error(&up)));
    }
    let v = up
        .json()
        .ok_or_else(|| "/upstreams: the answer is not JSON".to_string())?;
    let _ = writeln!(
        out,
        "workers: {}",
        v.get("workers").and_then(Value::as_u64).unwrap_or(0)
    );
    let groups = v
        .get("upstreams")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(out, "upstreams:");
    if groups.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    for g in &groups {
        let _ = writeln!(
            out,
            "  {} ({}, {} connections open)",
            text(g, "name"),
            text(g, "balance"),
            num(g, "open_connections")
        );
        for e in g
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ejected = match e.get("ejected_for_ms").and_then(Value::as_u64) {
                Some(ms) => format!("  ejected for {ms} ms"),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "    {:<24} {:<9}{}  weight {}  in flight {}  idle {}",
                text(e, "address"),
                text(e, "health"),
                ejected,
                num(e, "weight"),
                num(e, "in_flight"),
                num(e, "idle_pool")
            );
        }
    }
    Ok((out, is_ready))
}

/// `ringway drain`: asks the gateway to drain; returns what it answered.
pub fn drain(addr: SocketAddr, token: Option<&str>, delay: Option<&str>) -> Result<String, String> {
    let path = match delay {
        Some(d) => {
            if !d.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("--delay {d:?}: expected a duration such as 5s"));
            }
            format!("/drain?delay={d}")
        }
        None => "/drain".to_string(),
    };
    let r = call(addr, "POST", &path, token, TIMEOUT)?;
    if r.status != 202 {
        return Err(describe_error(&r));
    }
    let ms = r
        .json()
        .and_then(|v| v.get("listeners_close_in_ms").and_then(Value::as_u64))
        .unwrap_or(0);
    Ok(format!(
        "ringway at {addr}: draining; readiness fails now, listeners close in {ms} ms\n"
    ))
}

/// `ringway reload`: `POST /reload`; the running gateway re-reads the file it was started
/// with. Prints the reload's summary, or the refusal (the `ringway check` message).
pub fn reload(addr: SocketAddr, token: Option<&str>) -> Result<String, String> {
    // A reload waits for every worker (at most `crate::reload::RELOAD_ANSWER_LIMIT`).
    let limit = crate::reload::RELOAD_ANSWER_LIMIT + Duration::from_secs(5);
    let r = call(addr, "POST", "/reload", token, limit)?;
    if r.status != 200 {
        return Err(describe_error(&r));
    }
    let v = r.json().unwrap_or(Value::Null);
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out = format!(
        "ringway at {addr}: reload #{} applied: {} routes (was {}), {} ms\n",
        n("generation"),
        n("routes_after"),
        n("routes_before"),
        n("took_ms")
    );
    // What the report says besides: keys read at start only that changed (they take effect
    // at the next start) and the new config's warnings (as `ringway check` prints them).
    let strings = |k: &str| -> Vec<String> {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let kept = strings("not_reloaded");
    if !kept.is_empty() {
        out.push_str(&format!(
            "  not reloaded (read at start only): {}\n",
            kept.join(", ")
        ));
    }
    for w in strings("warnings") {
        out.push_str(&format!("  warning: {w}\n"));
    }
    Ok(out)
}
