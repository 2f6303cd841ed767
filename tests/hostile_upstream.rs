//! Hostile upstreams (`support::hostile`): oversized heads, too many headers, interim floods,
//! hop-by-hop fields in interim responses, bad chunk sizes, bytes after a bodiless response,
//! HTTP/1.0 with Transfer-Encoding, early closes, a body longer than its Content-Length.
//! Each test asserts what the client receives and that the gateway still serves afterwards.
//! Every scenario runs on both monoio drivers.

mod support;

use std::time::Duration;

use ringway::config::DriverChoice;
use support::hostile::{self, Hostile, FINE};
use support::*;

/// One endpoint, at most one idle pooled connection, short upstream timeouts.
fn gateway(up: &Upstream, d: DriverChoice) -> TestGateway {
    let toml = config(
        &[up.addr],
        "max_idle = 1\n\n[timeouts]\nupstream_response = \"2s\"\nupstream_body = \"1s\"\n\n[[routes]]\nupstream = \"up\"\n",
    );
    TestGateway::start(&toml, d)
}

/// A normal request afterwards, on a new client connection: the gateway is up and answers
/// with the upstream's real response (not bytes left over from an earlier exchange).
fn still_serves(gw: &TestGateway, d: DriverChoice, what: &str) {
    let r = get(gw.addr, "/ok");
    assert_eq!(r.status, 200, "{d:?} {what}: the gateway serves afterwards");
    assert_eq!(r.body, FINE, "{d:?} {what}: {}", r.text());
}

/// Sends a GET on a new connection; `None` when the connection ended before a complete
/// response (a response cut mid-body, or no response at all).
fn try_get(gw: &TestGateway, path: &str) -> (Option<Resp>, Vec<Resp>) {
    let mut c = Client::connect(gw.addr);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
    let mut interim = Vec::new();
    loop {
        match c.read_response() {
            Some(r) if r.status < 200 => interim.push(r),
            other => return (other, interim),
        }
    }
}

/// Sends `raw` on a new connection and returns every byte the gateway sends until it closes.
fn raw_exchange(gw: &TestGateway, raw: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut c = Client::connect(gw.addr);
    c.send(raw);
    let mut got = Vec::new();
    let _ = c.s.read_to_end(&mut got);
    got
}

#[test]
fn oversized_response_head_is_a_502() {
    for d in DRIVERS {
        let up = hostile::start(Hostile::OversizedHead(128 * 1024));
        let gw = gateway(&up, d);
        let (r, _) = try_get(&gw, "/big");
        assert_eq!(r.expect("an answer").status, 502, "{d:?}");
        still_serves(&gw, d, "oversized head");
    }
}

#[test]
fn too_many_response_headers_is_a_502() {
    for d in DRIVERS {
        let up = hostile::start(Hostile::TooManyHeaders(1000));
        let gw = gateway(&up, d);
        let (r, _) = try_get(&gw, "/many");
        assert_eq!(r.expect("an answer").status, 502, "{d:?}");
        still_serves(&gw, d, "too many headers");
    }
}

#[test]
fn interim_response_flood_is_cut() {
    const FLOOD: usize = 1000;
    for d in DRIVERS {
        let up = hostile::start(Hostile::InterimFlood(FLOOD));
        let gw = gateway(&up, d);
        let (r, interim) = try_get(&gw, "/flood");
        let r = r.expect("a final answer");
        assert!(
            r.status == 502 || (r.status == 200 && r.body == FINE),
            "{d:?}: {} {}",
            r.status,
            r.text()
        );
        assert!(
            interim.len() < FLOOD,
            "{d:?}: all {} interim responses reached the client; the gateway must limit them",
            interim.len()
        );
        still_serves(&gw, d, "1xx flood");
    }
}

#[test]
fn interim_responses_lose_their_hop_by_hop_fields() {
    for d in DRIVERS {
        let up = hostile::start(Hostile::InterimHopByHop);
        let gw = gateway(&up, d);
        let (r, interim) = try_get(&gw, "/hints");
        let r = r.expect("a final answer");
        assert_eq!((r.status, r.body.as_slice()), (200, FINE), "{d:?}");
        for i in &interim {
            assert_eq!(i.status, 103, "{d:?}");
            for name in ["connection", "keep-alive", "transfer-encoding", "x-secret"] {
                assert!(
                    !i.has(name),
                    "{d:?}: the interim response kept the hop-by-hop field {name}: {:?}",
                    i.headers
                );
            }
            assert!(
                i.has("link"),
                "{d:?}: end-to-end fields stay: {:?}",
                i.headers
            );
        }
        still_serves(&gw, d, "1xx with hop-by-hop fields");
    }
}

#[test]
fn bad_chunk_size_before_any_byte_went_to_the_client_is_a_502() {
    let lines: [(&str, &'static [u8]); 4] = [
        ("overflow", b"fffffffffffffffffff\r\n"),
        ("overflow, long", b"100000000000000000000000000000000\r\n"),
        ("not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
        ("negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ];
    let mut wrong = Vec::new();
    for d in DRIVERS {
        for (what, line) in lines {
            let up = hostile::start(Hostile::BadFirstChunk(line));
            let gw = gateway(&up, d);
            let got = raw_exchange(
                &gw,
                b"GET /chunks HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            );
            if !got.starts_with(b"HTTP/1.1 502 ") {
                wrong.push(format!(
                    "{d:?} {what}: got {:?}",
                    String::from_utf8_lossy(&got[..got.len().min(120)])
                ));
            }
            still_serves(&gw, d, what);
        }
    }
    assert!(wrong.is_empty(), "not a 502:\n{}", wrong.join("\n"));
}

#[test]
fn bad_chunk_framing_never_reaches_the_client_as_a_complete_response() {
    let lines: [(&str, &'static [u8]); 4] = [
        ("missing CRLF after data", b"5\r\nhelloXX0\r\n\r\n"),
        ("u64::MAX after data", b"ffffffffffffffff\r\nx\r\n0\r\n\r\n"),
        ("overflow after data", b"fffffffffffffffffff\r\n"),
        ("not hex after data", b"5x\r\nhello\r\n0\r\n\r\n"),
    ];
    for d in DRIVERS {
        for (what, line) in lines {
            // First chunk `hello` sent, the bad part 100 ms later.
            let up = hostile::start(Hostile::BadLaterChunk(line));
            let gw = gateway(&up, d);
            // The client's parser asserts chunk framing: a bad chunk passed through verbatim
            // fails here.
            let (r, _) = try_get(&gw, "/chunks");
            if let Some(r) = r {
                assert_eq!(
                    r.status,
                    502,
                    "{d:?} {what}: a bad chunk must cut the response or be a 502, got {} {:?}",
                    r.status,
                    r.text()
                );
            }
            still_serves(&gw, d, what);
        }
    }
}

/// The next client on the upstream's (single) pooled connection must not receive bytes the
/// upstream sent after a bodiless response.
#[test]
fn bytes_after_a_bodiless_response_never_reach_the_next_client() {
    let mut poisoned = Vec::new();
    for d in DRIVERS {
        for (what, status, raw) in [
            ("HEAD", 200, &b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n"[..]),
            ("204", 204, &b"GET /nc HTTP/1.1\r\nHost: a\r\n\r\n"[..]),
            (
                "304",
                304,
                &b"GET /nm HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"v1\"\r\n\r\n"[..],
            ),
        ] {
            let sent = Event::new();
            let up = hostile::start(Hostile::LateBytesAfterBodiless {
                status,
                sent: sent.clone(),
            });
            let gw = gateway(&up, d);
            let mut first = Client::connect(gw.addr);
            first.send(raw);
            let r = first
                .read_response_for(raw.starts_with(b"HEAD"))
                .expect("an answer");
            assert_eq!(r.status, status, "{d:?} {what}");
            assert!(
                sent.wait(Duration::from_secs(5)),
                "{d:?} {what}: the upstream wrote its late bytes"
            );
            // A second client, another connection to the gateway.
            let r = get(gw.addr, "/ok");
            if r.body != FINE {
                poisoned.push(format!("{d:?} {what}: {} {:?}", r.status, r.text()));
            }
            // The first client's connection is still in a sane state.
            first.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
            if let Some(r) = first.read_response() {
                if r.body != FINE {
                    poisoned.push(format!("{d:?} {what}, same client: {:?}", r.text()));
                }
            }
        }
    }
    assert!(
        poisoned.is_empty(),
        "clients got the upstream's late bytes (pooled connection poisoning):\n{}",
        poisoned.join("\n")
    );
}

/// RFC 9112 §9.3.2: bytes an upstream sends after a complete response, once the connection
/// is pooled, are never read as the next request's answer: a pooled connection is peeked
/// before reuse whatever the request (a GET that could be resent too), so one that has
/// something to read is not reused. Without the peek, each later client got the answer
/// meant for the one before it.
#[test]
fn bytes_after_a_complete_response_never_reach_the_next_client() {
    for d in DRIVERS {
        let sent = Event::new();
        let up = hostile::start(Hostile::LateBytesAfterComplete { sent: sent.clone() });
        let gw = gateway(&up, d);
        let r = get(gw.addr, "/late");
        assert_eq!((r.status, r.body.as_slice()), (200, FINE), "{d:?}");
        assert!(
            sent.wait(Duration::from_secs(5)),
            "{d:?}: late bytes written"
        );
        for i in 0..3 {
            let r = get(gw.addr, "/ok");
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, FINE),
                "{d:?} request {i}: got {:?}",
                r.text()
            );
        }
    }
}

/// RFC 9110 §8.6: a `Content-Length` the upstream gave on several lines or as a list of one
/// repeated value reaches the client as one line of that value, and a 204 carries none.
/// RFC 9112 §6.1: a transfer coding other than chunked (here gzip), which the gateway does
/// not decode, is a 502, not bytes relayed under other framing as if they were the content.
#[test]
fn content_length_lines_go_out_as_one_and_unknown_transfer_codings_are_refused() {
    for d in DRIVERS {
        let up = Upstream::start(|req| match req.target.as_str() {
            "/list" => Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\nfine".to_vec()),
            "/twice" => Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 4\r\n\r\nfine".to_vec(),
            ),
            "/204" => Reply::Raw(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n".to_vec()),
            "/gzip" => Reply::RawClose(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n\x1f\x8b\x08\x00".to_vec(),
            ),
            _ => Reply::Raw(hostile::fine()),
        });
        let gw = gateway(&up, d);
        for path in ["/list", "/twice"] {
            let r = get(gw.addr, path);
            assert_eq!((r.status, r.body.as_slice()), (200, FINE), "{d:?} {path}");
            let lines: Vec<&str> = r
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(lines, ["4"], "{d:?} {path}: {r:?}");
        }
        let r = get(gw.addr, "/204");
        assert_eq!(r.status, 204, "{d:?}");
        assert!(!r.has("content-length"), "{d:?}: {r:?}");
        let r = get(gw.addr, "/gzip");
        assert_eq!(r.status, 502, "{d:?}: {r:?}");
        still_serves(&gw, d, "after a gzip transfer coding");
    }
}

/// RFC 9112 §6.3 item 3 and §11.2: a response line named `Content_Length` or
/// `Transfer_Encoding` (any case, `_` for any `-`) is not relayed. ringway frames by the real
/// fields; a client or proxy after it that reads `_` as `-` (as CGI-style servers do for
/// requests) would frame by this one: the two would split the bytes differently. Dropped from
/// lengths, chunked and close-delimited responses and from 1xx alike; other lines stay.
#[test]
fn framing_fields_spelled_with_underscores_are_not_relayed_rfc9112_11_2() {
    for d in DRIVERS {
        let up = Upstream::start(|req| {
            match req.target.as_str() {
            "/length" => Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nContent_Length: 40\r\nx-after: 1\r\n\r\nfine"
                    .to_vec(),
            ),
            "/upper" => Reply::Raw(
                b"HTTP/1.1 200 OK\r\nTRANSFER_ENCODING: chunked\r\nCONTENT_LENGTH: 0\r\ncontent-length: 4\r\nx-after: 1\r\n\r\nfine"
                    .to_vec(),
            ),
            "/chunked" => Reply::Raw(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent_length: 4\r\nx-after: 1\r\n\r\n4\r\nfine\r\n0\r\n\r\n"
                    .to_vec(),
            ),
            "/close" => Reply::RawClose(
                b"HTTP/1.1 200 OK\r\nTransfer_Encoding: chunked\r\nx-after: 1\r\n\r\nfine".to_vec(),
            ),
            "/hints" => {
                let mut v = b"HTTP/1.1 103 Early Hints\r\nTransfer_Encoding: chunked\r\nlink: </s.css>; rel=preload\r\n\r\n".to_vec();
                v.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-after: 1\r\n\r\nfine");
                Reply::Raw(v)
            }
            _ => Reply::Raw(hostile::fine()),
        }
        });
        let gw = gateway(&up, d);
        for path in ["/length", "/upper", "/chunked", "/close", "/hints"] {
            let got = raw_exchange(
                &gw,
                format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
            );
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            for name in ["content_length", "transfer_encoding"] {
                assert!(!text.contains(name), "{d:?} {path}: {name} relayed: {text}");
            }
            assert!(text.contains("\r\nx-after: 1\r\n"), "{d:?} {path}: {text}");
            let mut c = Client::connect(gw.addr);
            c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
            let r = c.read_final();
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, FINE),
                "{d:?} {path}: {r:?}"
            );
        }
        still_serves(&gw, d, "framing fields spelled with underscores");
    }
}

/// RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; the connection
/// must be closed after it, never pooled.
#[test]
fn http10_response_with_transfer_encoding_is_not_pooled() {
    for d in DRIVERS {
        let up = hostile::start(Hostile::Http10Chunked);
        let gw = gateway(&up, d);
        let (r, _) = try_get(&gw, "/old");
        if let Some(r) = r {
            assert!(
                r.status == 200 || r.status == 502,
                "{d:?}: {} {}",
                r.status,
                r.text()
            );
        }
        still_serves(&gw, d, "HTTP/1.0 with Transfer-Encoding");
        assert_eq!(up.hits(), 2, "{d:?}");
        assert_eq!(
            up.conns(),
            2,
            "{d:?}: the connection of the HTTP/1.0 chunked response was reused"
        );
    }
}

#[test]
fn upstream_closing_mid_body_cuts_the_response() {
    for d in DRIVERS {
        let up = hostile::start(Hostile::EarlyClose);
        let gw = gateway(&up, d);
        let (r, _) = try_get(&gw, "/cut");
        if let Some(r) = r {
            assert_eq!(
                r.status,
                502,
                "{d:?}: a body cut short is never delivered as complete: {}",
                r.text()
            );
        }
        still_serves(&gw, d, "early close");
    }
}

#[test]
fn bytes_beyond_content_length_are_not_delivered_and_not_reused() {
    for d in DRIVERS {
        let up = hostile::start(Hostile::LongerThanLength);
        let gw = gateway(&up, d);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /long HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().expect("an answer");
        assert_eq!((r.status, r.body.as_slice()), (200, FINE), "{d:?}");
        // Nothing more arrives for this request.
        c.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
        if let Some(r) = c.read_response() {
            assert_eq!(r.body, FINE, "{d:?}: {}", r.text());
        }
        still_serves(&gw, d, "body longer than Content-Length");
    }
}

/// RFC 9110 §6.5.1/§6.5.2: a response's trailer fields reach the client filtered as request
/// trailers are under `trailers = "forward"`: nothing that frames (Content-Length,
/// Transfer-Encoding), routes (Host), authenticates, sets cookies, controls caching or is
/// hop-by-hop, and nothing the route removes from responses; other fields go through in
/// order. Also when the trailer section arrives in pieces, and the upstream connection is
/// reused afterwards.
#[test]
fn response_trailers_are_filtered_rfc9110_6_5() {
    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n";
    const DATA: &[u8] = b"5\r\nhello\r\n";
    const TRAILERS: &[u8] = b"0\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\nX-Checksum: abc\r\nSet-Cookie: s=1\r\nHost: evil\r\nCache-Control: max-age=9\r\nWWW-Authenticate: Basic\r\nConnection: close\r\nX-Internal: 1\r\nX_Checksum: u\r\nServer-Timing: db;dur=1\r\n\r\n";
    for d in DRIVERS {
        let up = Upstream::start_with(Some(Duration::from_secs(2)), |req| {
            match req.target.as_str() {
                "/ok" => Reply::Raw(hostile::fine()),
                "/whole" => Reply::Raw([HEAD, DATA, TRAILERS].concat()),
                "/pieces" => Reply::Script(vec![
                    Step::Write([HEAD, DATA, &TRAILERS[..9]].concat()),
                    Step::Wait(Duration::from_millis(50)),
                    Step::Write(TRAILERS[9..70].to_vec()),
                    Step::Wait(Duration::from_millis(50)),
                    Step::Write(TRAILERS[70..TRAILERS.len() - 1].to_vec()),
                    Step::Wait(Duration::from_millis(50)),
                    Step::Write(TRAILERS[TRAILERS.len() - 1..].to_vec()),
                ]),
                _ => Reply::Raw(hostile::fine()),
            }
        });
        let toml = config(
            &[up.addr],
            "max_idle = 1\n\n[timeouts]\nupstream_response = \"2s\"\nupstream_body = \"1s\"\n\n[[routes]]\nupstream = \"up\"\nresponse_headers = { remove = [\"x-internal\"] }\n",
        );
        let gw = TestGateway::start(&toml, d);
        for path in ["/whole", "/pieces"] {
            let got = raw_exchange(
                &gw,
                format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
            );
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200 "), "{d:?} {path}: {text}");
            let body = &text[text.find("\r\n\r\n").expect("a head") + 4..];
            assert_eq!(
                body, "5\r\nhello\r\n0\r\nX-Checksum: abc\r\nServer-Timing: db;dur=1\r\n\r\n",
                "{d:?} {path}"
            );
        }
        // The same (pooled) upstream connection serves the next request.
        still_serves(&gw, d, "after trailers");
        assert_eq!(up.conns(), 1, "{d:?}: the connection was not reused");
    }
}

// ---------------------------------------------------------------------------------------------
// A hostile identity provider.

fn rs256_token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("rsa".into());
    let pem = std::fs::read(format!(
        "{}/tests/data/auth/rsa_private.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
    let claims = serde_json::json!({"sub": "alice", "exp": now + 600});
    jsonwebtoken::encode(&h, &claims, &key).unwrap()
}

/// A JWKS server whose first answers are chunked with a chunk size of u64::MAX after a first
/// chunk (the overflow of issue 10), or a size past u64: the fetcher must fail cleanly and
/// fetch again, so that once the server behaves, tokens verify.
#[test]
fn jwks_server_with_overflowing_chunk_sizes_does_not_kill_the_fetcher() {
    let jwk = std::fs::read_to_string(format!(
        "{}/tests/data/auth/rsa_jwk.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    for d in DRIVERS {
        let set = format!("{{\"keys\": [{jwk}]}}");
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let f = fetches.clone();
        let keys = Upstream::start(move |_| {
            let n = f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let hostile: &[u8] = match n {
                0 => b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n1\r\n{\r\nffffffffffffffff\r\n",
                1 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n",
                _ => {
                    let mut v = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        set.len()
                    )
                    .into_bytes();
                    v.extend_from_slice(set.as_bytes());
                    return Reply::RawClose(v);
                }
            };
            Reply::RawClose(hostile.to_vec())
        });
        let up = Upstream::echo();
        let toml = config(
            &[up.addr],
            &format!(
                "[auth.jwt.idp]\njwks_url = \"http://{}/jwks\"\njwks_min_refresh_interval = \"100ms\"\n\n[[routes]]\npath = \"/ok\"\nupstream = \"up\"\n\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n",
                keys.addr
            ),
        );
        let gw = TestGateway::start(&toml, d);
        let token = rs256_token();
        let status = || {
            request(
                gw.addr,
                format!("GET /api HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n")
                    .as_bytes(),
            )
            .status
        };
        // Each 401 with an unknown kid asks for a refresh (at most every 100 ms).
        assert!(
            eventually(Duration::from_secs(5), || status() == 200),
            "{d:?}: after {} fetches the keys never arrived (did the fetcher die?)",
            fetches.load(std::sync::atomic::Ordering::SeqCst)
        );
        assert!(
            fetches.load(std::sync::atomic::Ordering::SeqCst) >= 3,
            "{d:?}"
        );
        assert_eq!(get(gw.addr, "/ok").status, 200, "{d:?}");
    }
}

/// Responses whose framing RFC 9112 calls faulty, or whose status line cannot be relayed as
/// HTTP/1.1, are a 502 on a plain route and on a cache route, and the cache route stores
/// nothing (a later `only-if-cached` request gets 504): an HTTP/1.0 response with
/// Transfer-Encoding (§6.1: "treat the message as if the framing is faulty"), Content-Length
/// with Transfer-Encoding (§6.3 item 3: "ought to be handled as an error"), chunked applied
/// twice, on one line or two (§6.1: a sender MUST NOT), and a status code outside 100..=599
/// (RFC 9110 §15: invalid; `099` went out as `HTTP/1.1 99`, a status line no client parses).
/// The connection that carried one is never reused.
#[test]
fn faulty_framing_and_invalid_status_are_a_502_and_never_stored_rfc9112_6_1_6_3() {
    const CC: &str = "cache-control: max-age=60\r\n";
    let cases: [(&str, String); 7] = [
        ("h10te", format!("HTTP/1.0 200 OK\r\n{CC}connection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n4\r\nfine\r\n0\r\n\r\n")),
        ("h10tecl", format!("HTTP/1.0 200 OK\r\n{CC}transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n4\r\nfine\r\n0\r\n\r\n")),
        ("clte", format!("HTTP/1.1 200 OK\r\n{CC}content-length: 50\r\ntransfer-encoding: chunked\r\n\r\n4\r\nfine\r\n0\r\n\r\n")),
        ("twice", format!("HTTP/1.1 200 OK\r\n{CC}transfer-encoding: chunked, chunked\r\n\r\n4\r\nfine\r\n0\r\n\r\n")),
        ("twolines", format!("HTTP/1.1 200 OK\r\n{CC}transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n4\r\nfine\r\n0\r\n\r\n")),
        ("s099", format!("HTTP/1.1 099 Odd\r\n{CC}content-length: 4\r\n\r\nfine")),
        ("s600", format!("HTTP/1.1 600 Odd\r\n{CC}content-length: 4\r\n\r\nfine")),
    ];
    let table: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(p, raw)| (format!("/{p}"), raw.clone().into_bytes()))
        .collect();
    for d in DRIVERS {
        let table = table.clone();
        let up = Upstream::start(move |req| {
            let path = match req.target.strip_prefix("/c/") {
                Some(rest) => &req.target[req.target.len() - rest.len() - 1..],
                None => req.target.as_str(),
            };
            match table.iter().find(|(p, _)| p == path) {
                Some((_, raw)) => Reply::Raw(raw.clone()),
                None => Reply::Raw(hostile::fine()),
            }
        });
        let toml = config(
            &[up.addr],
            "max_idle = 1\n\n[timeouts]\nupstream_response = \"2s\"\nupstream_body = \"1s\"\n\n\
             [[routes]]\npath_prefix = \"/c/\"\nupstream = \"up\"\ncache = {}\n\n\
             [[routes]]\nupstream = \"up\"\n",
        );
        let gw = TestGateway::start(&toml, d);
        for (p, _) in &cases {
            for path in [format!("/{p}"), format!("/c/{p}")] {
                let r = get(gw.addr, &path);
                assert_eq!(r.status, 502, "{d:?} {path}: {} {}", r.status, r.text());
                still_serves(&gw, d, &path);
            }
            let r = request(
                gw.addr,
                format!("GET /c/{p} HTTP/1.1\r\nHost: test.local\r\ncache-control: only-if-cached\r\n\r\n")
                    .as_bytes(),
            );
            assert_eq!(r.status, 504, "{d:?} /c/{p} was stored: {}", r.text());
        }
        // No connection that carried a faulty response was reused: each ended one.
        let faulty = up.targets().iter().filter(|t| t.as_str() != "/ok").count();
        assert!(faulty >= 2 * cases.len(), "{d:?}: {:?}", up.targets());
        assert!(
            up.conns() >= faulty,
            "{d:?}: {} connections for {faulty} faulty responses",
            up.conns()
        );
    }
}

/// RFC 9110 §2.5: a response in a higher minor version of HTTP/1 is processed as HTTP/1.1
/// (it was a 502), and its connection is reused like any other.
#[test]
fn http12_response_is_read_as_http11_rfc9110_2_5() {
    for d in DRIVERS {
        let up = Upstream::start(|_| {
            Reply::Raw(b"HTTP/1.2 200 OK\r\ncontent-length: 4\r\n\r\nfine".to_vec())
        });
        let gw = gateway(&up, d);
        for _ in 0..2 {
            let r = get(gw.addr, "/v12");
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, FINE),
                "{d:?}: {}",
                r.text()
            );
        }
        assert_eq!((up.hits(), up.conns()), (2, 1), "{d:?}");
    }
}

/// RFC 9110 §7.6.1 forbids a connection option naming a field meant for all recipients, and
/// RFC 9112 §6.3 makes a response without Content-Length or Transfer-Encoding end at the close.
/// An upstream's `Connection: content-length` used to strip the response's only framing:
/// the client got the body unframed on a connection kept open, so it read the next response
/// as this one's body. The Content-Length goes out; the next answer follows it at once.
#[test]
fn connection_option_naming_content_length_keeps_the_framing_rfc9110_7_6_1() {
    for d in DRIVERS {
        let up = Upstream::start(|req| {
            if req.target.ends_with("/ok") {
                return Reply::Raw(hostile::fine());
            }
            Reply::Raw(
                b"HTTP/1.1 200 OK\r\nconnection: content-length, x-hop\r\nx-hop: 1\r\ncontent-length: 4\r\n\r\nfine"
                    .to_vec(),
            )
        });
        let toml = config(
            &[up.addr],
            "[[routes]]\npath_prefix = \"/c/\"\nupstream = \"up\"\ncache = {}\n\n\
             [[routes]]\nupstream = \"up\"\n",
        );
        let gw = TestGateway::start(&toml, d);
        for prefix in ["", "/c"] {
            let mut c = Client::connect(gw.addr);
            c.send(
                format!(
                    "GET {prefix}/named HTTP/1.1\r\nHost: a\r\n\r\nGET {prefix}/ok HTTP/1.1\r\nHost: a\r\n\r\n"
                )
                .as_bytes(),
            );
            let r = c.read_response().expect("the first answer");
            assert_eq!(
                r.header("content-length"),
                Some("4"),
                "{d:?} {prefix}: {r:?}"
            );
            assert_eq!((r.status, r.body.as_slice()), (200, FINE), "{d:?} {prefix}");
            assert!(!r.has("x-hop"), "{d:?} {prefix}: {r:?}");
            let r = c.read_response().expect("the second answer");
            assert_eq!((r.status, r.body.as_slice()), (200, FINE), "{d:?} {prefix}");
        }
    }
}

/// Sends `raw` on a new connection and reads until the gateway ends it: the bytes, and how
/// it ended (`Ok`: a clean close, a FIN; `Err`: the error the read met, a reset).
fn read_until_end(gw: &TestGateway, raw: &[u8]) -> (Vec<u8>, Result<(), std::io::ErrorKind>) {
    use std::io::Read;
    let mut c = Client::connect(gw.addr);
    c.send(raw);
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        match c.s.read(&mut tmp) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&tmp[..n]),
            Err(e) => {
                assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "read timed out");
                return (got, Err(e.kind()));
            }
        }
    }
}

/// RFC 9112 §8 and §9.8: a response cut after its head went out must not look complete. An
/// HTTP/1.1 client sees it from the framing (no last chunk) and gets a plain close; an
/// HTTP/1.0 client reads a body of unknown length until the close, so for it the gateway
/// resets the connection (SO_LINGER 0) and the read fails with ECONNRESET. Cuts: the upstream
/// closing before the last chunk, and a close-delimited upstream body pausing past
/// `upstream_body`. A complete body still ends with a clean close. The same on a cache route,
/// whose fill relays the body while it captures it (the responses are storable). Before, the
/// HTTP/1.0 client got a FIN after a cut and took the partial body for the whole.
#[test]
fn a_cut_close_delimited_body_ends_with_a_reset_rfc9112_8() {
    use support::Step;
    for d in DRIVERS {
        for cached in [false, true] {
            let up = Upstream::start_with(Some(Duration::from_secs(2)), |req| {
                let chunked = b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
                match req.target.as_str() {
                    "/ok" => Reply::Raw(hostile::fine()),
                    "/whole" => Reply::RawClose([&chunked[..], b"0\r\n\r\n"].concat()),
                    // The upstream closes with no last chunk.
                    "/chunk-cut" => Reply::RawClose(chunked.to_vec()),
                    // A close-delimited body that stalls past `upstream_body` (1 s).
                    _ => Reply::Script(vec![
                        Step::Write(
                            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n\r\nhello".to_vec(),
                        ),
                        Step::Wait(Duration::from_secs(30)),
                        Step::Close,
                    ]),
                }
            });
            let gw = if cached {
                let toml = config(
                    &[up.addr],
                    "max_idle = 1\n\n[timeouts]\nupstream_response = \"2s\"\nupstream_body = \"1s\"\n\n[[routes]]\nupstream = \"up\"\ncache = { }\n",
                );
                TestGateway::start(&toml, d)
            } else {
                gateway(&up, d)
            };
            for path in ["/whole", "/chunk-cut", "/stall"] {
                let cut = path != "/whole";
                let what = format!("{d:?} cached={cached} {path}");
                let (got, end) = read_until_end(
                    &gw,
                    format!("GET {path} HTTP/1.0\r\nHost: a\r\n\r\n").as_bytes(),
                );
                let text = String::from_utf8_lossy(&got);
                assert!(text.starts_with("HTTP/1.1 200"), "{what}: {text}");
                assert!(!text.contains("transfer-encoding"), "{what}: {text}");
                assert_eq!(
                    text.to_ascii_lowercase().contains("cache-status:"),
                    cached,
                    "{what}: {text}"
                );
                if cut {
                    assert_eq!(
                        end,
                        Err(std::io::ErrorKind::ConnectionReset),
                        "{what}: an HTTP/1.0 client must see the cut: {text}"
                    );
                } else {
                    assert_eq!(end, Ok(()), "{what}: {text}");
                    assert!(text.ends_with("\r\n\r\nhello"), "{what}: {text}");
                }
                if cached {
                    // The whole body is a hit from here on; a cut one was not stored.
                    continue;
                }
                // HTTP/1.1: the framing tells the cut, and the close stays a plain one.
                let (got, end) = read_until_end(
                    &gw,
                    format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
                let text = String::from_utf8_lossy(&got);
                assert!(text.starts_with("HTTP/1.1 200"), "{what} 1.1: {text}");
                assert!(text.contains("\r\n5\r\nhello\r\n"), "{what} 1.1: {text}");
                assert_eq!(
                    text.ends_with("\r\n0\r\n\r\n"),
                    !cut,
                    "{what} 1.1: the last chunk only after a whole body: {text}"
                );
                if cut {
                    assert_eq!(end, Ok(()), "{what} 1.1: {text}");
                }
            }
            still_serves(&gw, d, "cut close-delimited body");
        }
    }
}
