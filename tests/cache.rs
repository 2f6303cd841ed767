//! The response cache over real sockets, one rule per test, each named or commented with its
//! RFC section (RFC 9111 caching, RFC 9110 conditionals and ranges, RFC 5861 stale serving,
//! RFC 9211 Cache-Status, RFC 9213 targeted fields), plus coalescing, eviction and purge.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use ringway::auth::apikey::key_hash_hex;
use ringway::cache::{Purge, PurgeTarget};
use ringway::config::DriverChoice;
use support::*;

const D: DriverChoice = DriverChoice::Auto;

/// A cache route in front of upstream "up", with `route_extra` inside its `cache = { }` and
/// `global` appended (a `[cache]` table, more routes).
fn cache_config(up: SocketAddr, cache: &str, global: &str) -> String {
    config(
        &[up],
        &format!("{global}\n[[routes]]\nupstream = \"up\"\ncache = {{ {cache} }}\n"),
    )
}

/// An origin whose every answer is `head_fields` (extra header lines) with a body that
/// counts the requests: "v1", "v2", ...
fn counting_origin(head_fields: &'static str) -> (Upstream, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let body = format!("v{i}");
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{head_fields}\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    (up, n)
}

fn get_h(addr: SocketAddr, path: &str, headers: &str) -> Resp {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n{headers}\r\n").as_bytes(),
    )
}

fn status_of(r: &Resp) -> String {
    r.header("cache-status").unwrap_or("").to_string()
}

/// A gateway with a default cache route to `up` and the admin API; the admin API's address.
fn gateway_with_admin(up: SocketAddr) -> (TestGateway, SocketAddr) {
    let toml = format!(
        "{}\n[admin]\naddress = \"127.0.0.1:0\"\n",
        cache_config(up, "", "")
    );
    let gw = TestGateway::start(&toml, D);
    let api = gw.gateway().admin_addr().expect("the admin API runs");
    (gw, api)
}

/// `r` is `body` answered from the store.
fn hit(r: &Resp, body: &str) {
    assert_eq!(r.text(), body, "{r:?}");
    assert!(status_of(r).contains("hit"), "{r:?}");
}

/// `r` is `body` fetched from the origin.
fn miss(r: &Resp, body: &str) {
    assert_eq!(r.text(), body, "{r:?}");
    assert!(status_of(r).contains("fwd="), "{r:?}");
}

#[test]
fn rfc9111_4_2_fresh_response_is_served_from_the_store_with_age_and_cache_status() {
    for d in DRIVERS {
        let (up, _) = counting_origin("cache-control: max-age=60\r\n");
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let a = get(gw.addr, "/a");
        assert_eq!((a.status, a.text().as_str()), (200, "v1"));
        assert!(status_of(&a).contains("fwd=uri-miss"), "{a:?}");
        assert!(status_of(&a).contains("stored"), "{a:?}");
        let b = get(gw.addr, "/a");
        assert_eq!((b.status, b.text().as_str()), (200, "v1"), "{d:?}");
        assert_eq!(up.hits(), 1);
        // RFC 9211 §2.1: hit; §2.6 ttl.
        assert!(status_of(&b).starts_with("ringway; hit; ttl="), "{b:?}");
        // RFC 9111 §5.1: Age on every answer from the store.
        assert!(b.header("age").is_some(), "{b:?}");
        // The key includes the query (default "all").
        assert_eq!(get(gw.addr, "/a?x=1").text(), "v2");
        assert_eq!(up.hits(), 2);
    }
}

/// No `Content_Length` or `Transfer_Encoding` line (any case, `_` for any `-`) on an answer.
fn no_underscore_framing(r: &Resp, what: &str) {
    for (name, _) in &r.headers {
        assert!(
            name != "content_length" && name != "transfer_encoding",
            "{what}: {name} relayed: {r:?}"
        );
    }
}

/// RFC 9112 §6.3 item 3, §11.2: an origin's `Content_Length` / `Transfer_Encoding` lines
/// (which a next hop reading `_` as `-` would frame by, while ringway does not) are not
/// relayed on the miss, not kept in the stored copy (the hit), and not taken from a 304 that
/// freshens it (RFC 9111 §4.3.4).
#[test]
fn rfc9112_11_2_framing_fields_spelled_with_underscores_are_neither_relayed_nor_stored() {
    for d in DRIVERS {
        let (up, _) = counting_origin(
            "cache-control: max-age=60\r\nContent_Length: 40\r\nTRANSFER_ENCODING: chunked\r\nx-after: 1\r\n",
        );
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let a = get(gw.addr, "/u");
        miss(&a, "v1");
        assert!(status_of(&a).contains("stored"), "{d:?}: {a:?}");
        no_underscore_framing(&a, "miss");
        let b = get(gw.addr, "/u");
        hit(&b, "v1");
        no_underscore_framing(&b, "hit");
        assert_eq!(b.header("x-after"), Some("1"), "{d:?}: {b:?}");
    }
    let up = validated_origin("transfer_encoding: chunked\r\nContent_Length: 9\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/e").text(), "body");
    let b = get(gw.addr, "/e");
    assert!(status_of(&b).contains("fwd-status=304"), "{b:?}");
    assert_eq!(
        (b.header("x-version"), b.text().as_str()),
        (Some("2"), "body")
    );
    no_underscore_framing(&b, "freshened by a 304");
    let c = get(gw.addr, "/e");
    assert_eq!(c.text(), "body", "{c:?}");
    no_underscore_framing(&c, "after the 304");
}

#[test]
fn rfc9111_3_no_store_and_private_responses_are_not_stored() {
    for (cc, detail) in [
        ("cache-control: no-store\r\n", "no-store"),
        ("cache-control: private, max-age=60\r\n", "private"),
        (
            "cache-control: max-age=60\r\nset-cookie: s=1\r\n",
            "set-cookie",
        ),
        ("cache-control: max-age=60\r\nvary: *\r\n", "vary-star"),
    ] {
        let (up, _) = counting_origin(cc);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        let a = get(gw.addr, "/p");
        assert!(
            status_of(&a).contains(&format!("detail={detail}")),
            "{cc}: {a:?}"
        );
        assert_eq!(get(gw.addr, "/p").text(), "v2", "{cc}");
        assert_eq!(up.hits(), 2, "{cc}");
    }
}

#[test]
fn rfc9111_3_request_no_store_is_honoured() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get_h(gw.addr, "/n", "Cache-Control: no-store\r\n");
    assert_eq!(get(gw.addr, "/n").text(), "v2");
}

#[test]
fn set_cookie_responses_are_not_stored_by_default_stripped_or_stored_when_the_route_says() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nset-cookie: sid=shared\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "set_cookie = \"strip\"", ""), D);
    let a = get(gw.addr, "/c");
    assert_eq!(a.header("set-cookie"), Some("sid=shared"));
    let b = get(gw.addr, "/c");
    assert_eq!(b.text(), "v1");
    assert_eq!(b.header("set-cookie"), None, "{b:?}");
    let gw = TestGateway::start(&cache_config(up.addr, "set_cookie = \"store\"", ""), D);
    get(gw.addr, "/c");
    let b = get(gw.addr, "/c");
    assert_eq!(b.text(), "v2");
    assert_eq!(b.header("set-cookie"), Some("sid=shared"), "{b:?}");
}

#[test]
fn rfc9111_3_5_authorized_requests_are_stored_only_when_the_response_allows() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let a = get_h(gw.addr, "/auth", "Authorization: Bearer x\r\n");
    assert!(status_of(&a).contains("detail=authorization"), "{a:?}");
    assert_eq!(get(gw.addr, "/auth").text(), "v2");

    let (up, _) = counting_origin("cache-control: s-maxage=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get_h(gw.addr, "/auth", "Authorization: Bearer x\r\n");
    assert_eq!(get(gw.addr, "/auth").text(), "v1", "s-maxage allows it");
}

#[test]
fn rfc9111_4_1_vary_selects_variants_and_accept_encoding_is_normalised() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        n2.fetch_add(1, Ordering::SeqCst);
        let gz = req
            .header("accept-encoding")
            .is_some_and(|v| v.contains("gzip"));
        let body = if gz { "gzipped" } else { "plain" };
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\nvary: Accept-Encoding\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(
        get_h(gw.addr, "/v", "Accept-Encoding: gzip, br\r\n").text(),
        "gzipped"
    );
    // Not served the gzip body (the Kong#12796 failure).
    let plain = get(gw.addr, "/v");
    assert_eq!(plain.text(), "plain");
    assert!(status_of(&plain).contains("fwd=vary-miss"), "{plain:?}");
    // Same set of codings, other order and spacing: the same variant.
    let again = get_h(gw.addr, "/v", "Accept-Encoding: BR,gzip\r\n");
    assert_eq!(again.text(), "gzipped");
    assert!(status_of(&again).contains("hit"), "{again:?}");
    assert_eq!(get(gw.addr, "/v").text(), "plain");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[test]
fn variants_per_key_are_capped() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        n2.fetch_add(1, Ordering::SeqCst);
        let body = req.header("x-lang").unwrap_or("none").to_string();
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\nvary: x-lang\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", "[cache]\nmax_variants = 2\n"), D);
    for l in ["a", "b", "c"] {
        assert_eq!(get_h(gw.addr, "/l", &format!("x-lang: {l}\r\n")).text(), l);
    }
    // "a" was the oldest of three with a cap of two: fetched again; "c" is still stored.
    assert_eq!(get_h(gw.addr, "/l", "x-lang: c\r\n").text(), "c");
    assert_eq!(n.load(Ordering::SeqCst), 3);
    get_h(gw.addr, "/l", "x-lang: a\r\n");
    assert_eq!(n.load(Ordering::SeqCst), 4);
}

/// An origin whose answer is stale at once (`max-age=0`) with `ETag: "e1"`, body `body` and
/// `x-version: 1`; a request that validates that tag gets a 304 with `extra_304` (header
/// lines) and `x-version: N`, N counting the origin's requests.
fn validated_origin(extra_304: &'static str) -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |req| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        if req.header("if-none-match") == Some("\"e1\"") {
            return Reply::Raw(
                format!("HTTP/1.1 304 Not Modified\r\netag: \"e1\"\r\n{extra_304}x-version: {i}\r\n\r\n")
                    .into_bytes(),
            );
        }
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\netag: \"e1\"\r\ncache-control: max-age=0\r\nx-version: 1\r\ncontent-length: 4\r\n\r\nbody"
                .to_vec(),
        )
    })
}

#[test]
fn rfc9111_4_3_stale_responses_are_validated_and_a_304_updates_the_stored_headers() {
    let up = validated_origin("cache-control: max-age=0\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/e").text(), "body");
    let b = get(gw.addr, "/e");
    // §4.3.1: the stored validator went upstream.
    assert_eq!(up.last().header("if-none-match"), Some("\"e1\""));
    assert_eq!(b.status, 200);
    assert_eq!(b.text(), "body");
    // §4.3.4: the 304's fields replace the stored ones.
    assert_eq!(b.header("x-version"), Some("2"), "{b:?}");
    assert!(status_of(&b).contains("fwd=stale; fwd-status=304"), "{b:?}");
    let c = get(gw.addr, "/e");
    assert_eq!(c.header("x-version"), Some("3"));
}

/// RFC 9111 §4.3.3, §4.3.4: a 304 whose freshened response may not be stored (it sets a
/// cookie the route does not store, or says `private`) still answers the request that
/// validated it, with its fields (the client's new cookie among them), and the stored
/// response is dropped.
#[test]
fn rfc9111_4_3_4_a_304_that_may_not_be_stored_still_answers_with_its_fields() {
    for (extra, what) in [
        ("set-cookie: sess=new\r\n", "set-cookie"),
        ("cache-control: private\r\n", "private"),
    ] {
        let up = validated_origin(extra);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        assert_eq!(get(gw.addr, "/e").text(), "body");
        let b = get(gw.addr, "/e");
        assert_eq!(up.last().header("if-none-match"), Some("\"e1\""), "{what}");
        assert_eq!(
            (b.status, b.text().as_str()),
            (200, "body"),
            "{what}: {b:?}"
        );
        assert_eq!(b.header("x-version"), Some("2"), "{what}: {b:?}");
        assert!(
            status_of(&b).contains("fwd=stale; fwd-status=304"),
            "{what}: {b:?}"
        );
        assert!(!status_of(&b).contains("stored"), "{what}: {b:?}");
        if what == "set-cookie" {
            assert_eq!(b.header("set-cookie"), Some("sess=new"), "{b:?}");
        } else {
            assert_eq!(b.header("cache-control"), Some("private"), "{b:?}");
        }
        // Not stored: the next request is a miss (fetched whole, no validator to send).
        let c = get(gw.addr, "/e");
        assert!(status_of(&c).contains("uri-miss"), "{what}: {c:?}");
        assert_eq!(up.last().header("if-none-match"), None, "{what}");
        assert_eq!(c.header("set-cookie"), None, "{what}: {c:?}");
    }
}

#[test]
fn rfc9110_13_client_conditionals_are_answered_304_from_the_store() {
    let (up, _) = counting_origin(
        "cache-control: max-age=60\r\netag: \"abc\"\r\nlast-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/c");
    let r = get_h(gw.addr, "/c", "If-None-Match: W/\"abc\"\r\n");
    assert_eq!(r.status, 304, "{r:?}");
    assert_eq!(r.header("etag"), Some("\"abc\""));
    assert!(r.body.is_empty());
    let r = get_h(
        gw.addr,
        "/c",
        "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n",
    );
    assert_eq!(r.status, 304);
    let r = get_h(gw.addr, "/c", "If-None-Match: \"other\"\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "v1"));
    // §13.1.1: If-Match that fails is 412.
    let r = get_h(gw.addr, "/c", "If-Match: \"other\"\r\n");
    assert_eq!(r.status, 412);
    assert_eq!(up.hits(), 1);
}

/// RFC 9110 §5.3, §13.1.1, §13.1.2: `If-Match` and `If-None-Match` given on several lines
/// are one list; entity tags are split outside quoted strings (a tag may hold a comma).
#[test]
fn rfc9110_13_1_conditionals_on_several_lines_are_one_list() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\netag: \"abc\"\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/c");
    let r = get_h(
        gw.addr,
        "/c",
        "If-None-Match: \"x\"\r\nIf-None-Match: \"abc\"\r\n",
    );
    assert_eq!(r.status, 304, "{r:?}");
    let r = get_h(
        gw.addr,
        "/c",
        "If-None-Match: \"x\"\r\nIf-None-Match: \"y\"\r\n",
    );
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    let r = get_h(gw.addr, "/c", "If-Match: \"x\"\r\nIf-Match: \"abc\"\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    let r = get_h(gw.addr, "/c", "If-Match: \"x\"\r\nIf-Match: \"y\"\r\n");
    assert_eq!(r.status, 412, "{r:?}");
    assert_eq!(up.hits(), 1);
    let (up, _) = counting_origin("cache-control: max-age=60\r\netag: \"a,b\"\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/c");
    let r = get_h(gw.addr, "/c", "If-Match: \"z\", \"a,b\"\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    let r = get_h(gw.addr, "/c", "If-Match: \"a\"\r\n");
    assert_eq!(r.status, 412, "{r:?}");
}

/// RFC 9110 §13.1.5, §8.8.2.2: an `If-Range` date applies the range only when the stored
/// Last-Modified is strong (the stored Date at least a second after it); a weak one gives
/// the whole representation.
#[test]
fn rfc9110_13_1_5_if_range_with_a_weak_last_modified_gives_the_whole_body() {
    let t = now() - 10;
    let date = |s: u64| String::from_utf8(ringway::date::http_date(s).to_vec()).unwrap();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    for (date_at, partial) in [(t, false), (t + 1, true)] {
        let (up, _) = counting_origin(leak(format!(
            "cache-control: max-age=600\r\ndate: {}\r\nlast-modified: {}\r\n",
            date(date_at),
            date(t)
        )));
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        get(gw.addr, "/r");
        let r = get_h(
            gw.addr,
            "/r",
            &format!("Range: bytes=0-0\r\nIf-Range: {}\r\n", date(t)),
        );
        assert_eq!(up.hits(), 1, "{r:?}");
        if partial {
            assert_eq!((r.status, r.text().as_str()), (206, "v"), "{r:?}");
        } else {
            assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
        }
    }
}

/// RFC 9111 §4.3.2: `If-Modified-Since` against a stored response without `Last-Modified` is
/// evaluated with its `Date` (or, with no Date from the origin, the time it was received),
/// by RFC 9110 §13.1.3: not modified (304) when that date is at or before the client's, the
/// stored response (200) when it is later. The other rules of §13.1.3 and §13.2.2 hold: an
/// `If-None-Match` takes precedence, and an invalid date or a list of dates (several lines)
/// is ignored; `If-Unmodified-Since` (§13.1.4) likewise.
#[test]
fn rfc9111_4_3_2_if_modified_since_without_last_modified_is_evaluated_with_date() {
    let t = now() - 100;
    let date = |s: u64| String::from_utf8(ringway::date::http_date(s).to_vec()).unwrap();
    let ims = |s: u64| format!("If-Modified-Since: {}\r\n", date(s));
    let fields = format!("cache-control: max-age=600\r\ndate: {}\r\n", date(t));
    let (up, _) = counting_origin(Box::leak(fields.into_boxed_str()));
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/d");
    for at in [t, t + 50] {
        let r = get_h(gw.addr, "/d", &ims(at));
        assert_eq!(
            r.status,
            304,
            "IMS at Date{:+}: {r:?}",
            at as i64 - t as i64
        );
        assert!(r.body.is_empty(), "{r:?}");
    }
    let head = format!("HEAD /d HTTP/1.1\r\nHost: test.local\r\n{}\r\n", ims(t));
    assert_eq!(request(gw.addr, head.as_bytes()).status, 304);
    // Date 3000 s after the client's date: modified since (the cache-tests suite's
    // `conditional-lm-fresh-no-lm` expects 304 here, against §13.1.3).
    let r = get_h(gw.addr, "/d", &ims(t - 3000));
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    for (what, headers) in [
        (
            "If-None-Match first",
            format!("If-None-Match: \"x\"\r\n{}", ims(t)),
        ),
        (
            "invalid date",
            "If-Modified-Since: yesterday\r\n".to_string(),
        ),
        ("two dates", format!("{}{}", ims(t), ims(t + 1))),
        (
            "two If-Unmodified-Since dates",
            format!(
                "If-Unmodified-Since: {}\r\nIf-Unmodified-Since: {}\r\n",
                date(t - 10),
                date(t - 5)
            ),
        ),
    ] {
        let r = get_h(gw.addr, "/d", &headers);
        assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{what}: {r:?}");
    }
    assert_eq!(up.hits(), 1);
    // No Date from the origin: the time the response was received stands in (ringway stores
    // it as the response's Date, RFC 9110 §6.6.1).
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/n");
    let r = get_h(gw.addr, "/n", &ims(now() + 3600));
    assert_eq!(r.status, 304, "{r:?}");
    let r = get_h(gw.addr, "/n", &ims(now() - 3600));
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    assert_eq!(up.hits(), 1);
}

/// RFC 9111 §5.2.1.2, §5.2.1.3 with RFC 5861 §3: a client that takes no response stale by
/// more than `max-stale`, or asks `min-fresh`, is not answered with a stale response under
/// `stale-while-revalidate`: the response is validated first.
#[test]
fn rfc5861_3_a_client_s_max_stale_or_min_fresh_refuses_a_stale_while_revalidate_answer() {
    // Stale by four seconds from the start (Age 5, max-age=1).
    let (up, _) =
        counting_origin("cache-control: max-age=1, stale-while-revalidate=600\r\nage: 5\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/s").text(), "v1");
    // Without a word from the client, served at once.
    let r = get(gw.addr, "/s");
    assert_eq!(r.text(), "v1", "{r:?}");
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    // The background revalidation (v2) is stored before the next request is looked up.
    assert!(eventually(Duration::from_secs(5), || up.hits() == 2));
    for (req, body) in [
        ("Cache-Control: max-stale=0\r\n", "v3"),
        ("Cache-Control: min-fresh=5\r\n", "v4"),
    ] {
        let r = get_h(gw.addr, "/s", req);
        assert!(
            !status_of(&r).contains("stale-while-revalidate"),
            "{req}: {r:?}"
        );
        assert_eq!(r.text(), body, "{req}: {r:?}");
    }
}

#[test]
fn rfc9110_14_single_ranges_are_served_206_from_a_stored_full_response() {
    let up = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"r\"\r\ncontent-length: 10\r\n\r\n0123456789"
                .to_vec(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/r");
    let r = get_h(gw.addr, "/r", "Range: bytes=2-5\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.text(), "2345");
    assert_eq!(r.header("content-range"), Some("bytes 2-5/10"));
    let r = get_h(gw.addr, "/r", "Range: bytes=-3\r\n");
    assert_eq!(r.text(), "789");
    // §14.1: the range unit is case-insensitive.
    let r = get_h(gw.addr, "/r", "Range: Bytes=1-2\r\n");
    assert_eq!((r.status, r.text().as_str()), (206, "12"));
    let r = get_h(gw.addr, "/r", "Range: bytes=20-\r\n");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */10"));
    // §13.1.5: If-Range that does not match: the whole representation.
    let r = get_h(gw.addr, "/r", "Range: bytes=0-1\r\nIf-Range: \"old\"\r\n");
    assert_eq!((r.status, r.body.len()), (200, 10));
    assert_eq!(up.hits(), 1);
}

#[test]
fn rfc9110_9_3_2_head_is_answered_from_a_stored_get() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/h");
    let r = request(gw.addr, b"HEAD /h HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("2"));
    assert!(r.body.is_empty());
    assert_eq!(up.hits(), 1);
}

#[test]
fn rfc9111_4_4_unsafe_methods_invalidate_the_target_uri_and_location() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nlocation: /other\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/i").text(), "v1");
    assert_eq!(get(gw.addr, "/other").text(), "v2");
    assert_eq!(get(gw.addr, "/i").text(), "v1");
    let r = request(
        gw.addr,
        b"POST /i HTTP/1.1\r\nHost: test.local\r\nContent-Length: 1\r\n\r\nx",
    );
    assert_eq!(r.status, 200);
    assert_eq!(get(gw.addr, "/i").text(), "v4");
    assert_eq!(get(gw.addr, "/other").text(), "v5");
}

#[test]
fn rfc9111_5_2_1_only_if_cached_answers_504_when_nothing_is_stored() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let r = get_h(gw.addr, "/o", "Cache-Control: only-if-cached\r\n");
    assert_eq!(r.status, 504);
    assert_eq!(up.hits(), 0);
    get(gw.addr, "/o");
    assert_eq!(
        get_h(gw.addr, "/o", "Cache-Control: only-if-cached\r\n").status,
        200
    );
}

#[test]
fn rfc9111_5_2_1_4_request_no_cache_and_max_age_0_go_to_the_origin() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/x");
    assert_eq!(
        get_h(gw.addr, "/x", "Cache-Control: no-cache\r\n").text(),
        "v2"
    );
    assert_eq!(get_h(gw.addr, "/x", "Pragma: no-cache\r\n").text(), "v3");
    assert_eq!(
        get_h(gw.addr, "/x", "Cache-Control: max-age=0\r\n").text(),
        "v4"
    );
    assert_eq!(get(gw.addr, "/x").text(), "v4");
}

/// RFC 9110 §6.6.1: a response the origin sends without Date gets one when it is forwarded
/// (the miss) as when it is stored (the hit that follows): before, the miss went out without
/// one. Exactly one line each time.
#[test]
fn rfc9110_6_6_1_a_miss_without_date_is_forwarded_with_one() {
    for d in DRIVERS {
        let (up, _) = counting_origin("cache-control: max-age=60\r\n");
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let dates = |r: &Resp| r.all("date").len();
        let a = get(gw.addr, "/undated");
        miss(&a, "v1");
        assert_eq!(dates(&a), 1, "{d:?}: {a:?}");
        assert!(
            a.header("date")
                .is_some_and(|v| v.len() == 29 && v.ends_with(" GMT")),
            "{a:?}"
        );
        let b = get(gw.addr, "/undated");
        hit(&b, "v1");
        assert_eq!(dates(&b), 1, "{d:?}: {b:?}");
    }
}

/// RFC 9110 §5.3: one Date line on an answer from the store too. A cache route whose
/// `response_headers` set Date answers a hit with that Date alone, and one that removes Date
/// answers without one, and one that adds Date answers with the added one alone, as its
/// forwarded responses do (RFC 9110 §6.6.1's addition is the gateway's only when the route
/// says nothing of Date). Before, the hit carried the gateway's Date and then the set one (two
/// lines), the removal was undone, and an added Date went out after the stored one.
#[test]
fn rfc9110_5_3_a_hit_on_a_route_that_sets_or_removes_date_has_its_one_date() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let routes = "[[routes]]\npath_prefix = \"/set\"\nupstream = \"up\"\ncache = {}\n\
                  response_headers = { set = { \"date\" = \"Tue, 14 Nov 2023 22:13:10 GMT\" } }\n\
                  [[routes]]\npath_prefix = \"/rm\"\nupstream = \"up\"\ncache = {}\n\
                  response_headers = { remove = [\"date\"] }\n\
                  [[routes]]\npath_prefix = \"/add\"\nupstream = \"up\"\ncache = {}\n\
                  response_headers = { add = { \"date\" = \"Sun, 06 Nov 1994 08:49:37 GMT\" } }\n";
    let gw = TestGateway::start(&config(&[up.addr], routes), D);
    let a = get(gw.addr, "/set/x");
    miss(&a, "v1");
    assert_eq!(a.all("date"), ["Tue, 14 Nov 2023 22:13:10 GMT"], "{a:?}");
    let b = get(gw.addr, "/set/x");
    hit(&b, "v1");
    assert_eq!(b.all("date"), ["Tue, 14 Nov 2023 22:13:10 GMT"], "{b:?}");
    let a = get(gw.addr, "/rm/x");
    miss(&a, "v2");
    assert!(a.all("date").is_empty(), "{a:?}");
    let b = get(gw.addr, "/rm/x");
    hit(&b, "v2");
    assert!(b.all("date").is_empty(), "{b:?}");
    // Added, it replaces the Date stored (the time the miss was received).
    let a = get(gw.addr, "/add/x");
    miss(&a, "v3");
    assert_eq!(a.all("date"), ["Sun, 06 Nov 1994 08:49:37 GMT"], "{a:?}");
    let b = get(gw.addr, "/add/x");
    hit(&b, "v3");
    assert_eq!(b.all("date"), ["Sun, 06 Nov 1994 08:49:37 GMT"], "{b:?}");
}

#[test]
fn rfc9111_4_2_3_age_from_the_origin_counts() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nage: 100\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/g");
    // Already older than its lifetime on arrival: not fresh, fetched again.
    assert_eq!(get(gw.addr, "/g").text(), "v2");
    let (up, _) = counting_origin("cache-control: max-age=600\r\nage: 100\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/g");
    let r = get(gw.addr, "/g");
    let age: u64 = r.header("age").unwrap().parse().unwrap();
    assert!((100..110).contains(&age), "{r:?}");
}

#[test]
fn rfc9111_4_2_1_expires_and_4_2_2_heuristic_freshness() {
    let future = ringway::date::http_date(now() + 3600);
    let past = ringway::date::http_date(now() - 3600);
    let head: &'static str = Box::leak(
        format!("expires: {}\r\n", std::str::from_utf8(&future).unwrap()).into_boxed_str(),
    );
    let (up, _) = counting_origin(head);
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/x");
    assert_eq!(get(gw.addr, "/x").text(), "v1", "Expires in the future");
    // An invalid Expires is in the past (§5.3).
    let (up, _) = counting_origin("expires: 0\r\netag: \"z\"\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/x");
    assert_eq!(get(gw.addr, "/x").text(), "v2");
    // Last-Modified an hour ago: 10% heuristic lifetime.
    let head: &'static str = Box::leak(
        format!("last-modified: {}\r\n", std::str::from_utf8(&past).unwrap()).into_boxed_str(),
    );
    let (up, _) = counting_origin(head);
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/x");
    assert_eq!(get(gw.addr, "/x").text(), "v1", "heuristic");
    let gw2 = TestGateway::start(&cache_config(up.addr, "heuristic = false", ""), D);
    get(gw2.addr, "/x");
    assert_eq!(get(gw2.addr, "/x").text(), "v3", "heuristics off");
}

#[test]
fn rfc5861_3_stale_while_revalidate_answers_at_once_and_revalidates_in_the_background() {
    let (up, _) = counting_origin("cache-control: max-age=0, stale-while-revalidate=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/s").text(), "v1");
    let r = get(gw.addr, "/s");
    assert_eq!(r.text(), "v1");
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() >= 2));
    assert!(eventually(Duration::from_secs(5), || get(gw.addr, "/s")
        .text()
        .starts_with('v')
        && up.hits() >= 2
        && get(gw.addr, "/s").text() != "v1"));
}

#[test]
fn rfc5861_4_stale_if_error_serves_the_stored_response_when_the_origin_fails() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=0, stale-if-error=60\r\ncontent-length: 2\r\n\r\nok".to_vec())
        } else {
            Reply::Raw(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown".to_vec(),
            )
        }
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/e").text(), "ok");
    let r = get(gw.addr, "/e");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");
    assert!(status_of(&r).contains("stale-if-error"));
    // must-revalidate forbids it (§5.2.2.2): the error goes through.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up2 = Upstream::start(move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=0, must-revalidate, stale-if-error=60\r\netag: \"m\"\r\ncontent-length: 2\r\n\r\nok".to_vec())
        } else {
            Reply::Raw(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown".to_vec(),
            )
        }
    });
    let gw = TestGateway::start(&cache_config(up2.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/m").text(), "ok");
    let r = get(gw.addr, "/m");
    assert_eq!((r.status, r.text().as_str()), (503, "down"), "{r:?}");
}

#[test]
fn stale_if_error_route_override_applies_when_the_origin_is_down() {
    let mut up = Upstream::start(|_| {
        Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"q\"\r\ncontent-length: 2\r\n\r\nok".to_vec())
    });
    let gw = TestGateway::start(&cache_config(up.addr, "stale_if_error = \"60s\"", ""), D);
    assert_eq!(get(gw.addr, "/d").text(), "ok");
    up.stop();
    let r = get(gw.addr, "/d");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");
}

/// RFC 9111 §3, §5.2.2.5, §5.2.2.7; RFC 9213 §2.2: a directive line too long to read
/// (over 8 KiB) is not read in part: what it says past the bound could be `private` or
/// `no-store`, so the response is not stored (and a request's such line keeps its response
/// out of the store).
#[test]
fn rfc9111_3_a_directive_line_too_long_to_read_keeps_the_response_out_of_the_store() {
    let filler = "a".repeat(8300);
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    for head in [
        format!("cache-control: max-age=600, ext={filler}, private\r\n"),
        format!("cache-control: max-age=600\r\ncdn-cache-control: no-store, x={filler}\r\n"),
    ] {
        let (up, _) = counting_origin(leak(head));
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        let a = get(gw.addr, "/long");
        assert_eq!(a.text(), "v1");
        assert!(!status_of(&a).contains("stored"), "{a:?}");
        assert_eq!(get(gw.addr, "/long").text(), "v2");
    }
    // The request's own line: its response is not stored.
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let long = format!("Cache-Control: ext={filler}, no-store\r\n");
    assert_eq!(get_h(gw.addr, "/req", &long).text(), "v1");
    assert_eq!(get(gw.addr, "/req").text(), "v2");
    // A line within the bound is read as before.
    let (up, _) = counting_origin(leak(format!(
        "cache-control: max-age=600, ext={}\r\n",
        "a".repeat(8000)
    )));
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/ok").text(), "v1");
    assert_eq!(get(gw.addr, "/ok").text(), "v1");
}

#[test]
fn rfc9213_cdn_cache_control_replaces_cache_control_for_this_cache() {
    let (up, _) = counting_origin("cache-control: no-store\r\ncdn-cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/t");
    let r = get(gw.addr, "/t");
    assert_eq!(r.text(), "v1");
    // Passed on to the client for caches further down.
    assert_eq!(r.header("cdn-cache-control"), Some("max-age=60"));

    let (up, _) = counting_origin("cache-control: max-age=60\r\ncdn-cache-control: no-store\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/t");
    assert_eq!(get(gw.addr, "/t").text(), "v2");

    // An invalid targeted field is ignored: Cache-Control applies (§2.1).
    let (up, _) =
        counting_origin("cache-control: max-age=60\r\ncdn-cache-control: max-age=\"x\"\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/t");
    assert_eq!(get(gw.addr, "/t").text(), "v1");

    // A configured field of its own, most specific first.
    let (up, _) = counting_origin(
        "cache-control: max-age=60\r\ncdn-cache-control: max-age=60\r\nringway-cache-control: no-store\r\n",
    );
    let gw = TestGateway::start(
        &cache_config(
            up.addr,
            "",
            "[cache]\ntargeted_fields = [\"ringway-cache-control\", \"cdn-cache-control\"]\n",
        ),
        D,
    );
    get(gw.addr, "/t");
    assert_eq!(get(gw.addr, "/t").text(), "v2");
}

/// RFC 9213 §2.1: in a targeted field `private` and `no-cache` name fields with a String (or
/// a Token); a number names none, and the directive then holds for the whole response (the
/// more restrictive reading, RFC 9111 §4.2.1): `private=1` is not stored, `no-cache=1` is
/// validated before each use.
#[test]
fn rfc9213_2_1_a_number_for_private_or_no_cache_qualifies_nothing() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\ncdn-cache-control: private=1\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/t");
    assert_eq!(get(gw.addr, "/t").text(), "v2");

    let (up, _) = counting_origin(
        "cache-control: max-age=60\r\ncdn-cache-control: max-age=60, no-cache=1\r\n",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/t");
    assert_eq!(get(gw.addr, "/t").text(), "v2");

    // A String names the fields: the response itself is stored.
    let (up, _) = counting_origin(
        "cache-control: max-age=60\r\ncdn-cache-control: max-age=60, private=\"x-a\"\r\n",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/t");
    assert_eq!(get(gw.addr, "/t").text(), "v1");
}

/// `Surrogate-Control` (W3C Edge Architecture Specification 1.0, §3) is not obeyed by default:
/// ringway often sits behind a CDN that reads it, and a surrogate obeys it and takes it off
/// the response. Opting in is configuration alone: the field in `[cache] targeted_fields`,
/// after `CDN-Cache-Control` (which then wins, RFC 9213 §2.2), and the route's
/// `response_headers.remove`. Its common forms (`max-age=N`, `no-store`) parse as the
/// Structured Fields dictionary a targeted field is (RFC 9213 §2.1).
#[test]
fn edge_arch_surrogate_control_is_obeyed_and_removed_only_when_configured() {
    // Default: ignored (Cache-Control decides) and passed on.
    let (up, _) = counting_origin("cache-control: no-store\r\nsurrogate-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/sc").text(), "v1");
    let r = get(gw.addr, "/sc");
    assert_eq!(r.text(), "v2");
    assert_eq!(r.header("surrogate-control"), Some("max-age=60"), "{r:?}");

    let surrogate = |up: SocketAddr| {
        config(
            &[up],
            "[cache]\ntargeted_fields = [\"cdn-cache-control\", \"surrogate-control\"]\n\
             [[routes]]\nupstream = \"up\"\ncache = {}\n\
             response_headers = { remove = [\"surrogate-control\"] }\n",
        )
    };
    // Opted in: it replaces Cache-Control for this cache, and no answer carries it.
    let (up, _) = counting_origin("cache-control: no-store\r\nsurrogate-control: max-age=60\r\n");
    let gw = TestGateway::start(&surrogate(up.addr), D);
    let a = get(gw.addr, "/sc");
    assert_eq!(a.text(), "v1");
    let b = get(gw.addr, "/sc");
    assert_eq!(b.text(), "v1", "{b:?}");
    assert!(status_of(&b).contains("hit"), "{b:?}");
    for r in [&a, &b] {
        assert_eq!(r.header("surrogate-control"), None, "{r:?}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    }
    // `no-store` there wins over a fresh Cache-Control.
    let (up, _) = counting_origin("cache-control: max-age=60\r\nsurrogate-control: no-store\r\n");
    let gw = TestGateway::start(&surrogate(up.addr), D);
    get(gw.addr, "/sc");
    assert_eq!(get(gw.addr, "/sc").text(), "v2");
    // CDN-Cache-Control comes first.
    let (up, _) = counting_origin(
        "cache-control: max-age=60\r\ncdn-cache-control: no-store\r\nsurrogate-control: max-age=60\r\n",
    );
    let gw = TestGateway::start(&surrogate(up.addr), D);
    get(gw.addr, "/sc");
    assert_eq!(get(gw.addr, "/sc").text(), "v2");
}

/// RFC 9111 §4.4: the cache invalidates when it receives the non-error answer to an unsafe
/// method, before the client has it. Before, the stored response went only once the answer
/// had been relayed whole, so a GET on another connection while a DELETE's answer was still
/// streaming got the copy the DELETE had made stale.
#[test]
fn rfc9111_4_4_invalidation_happens_before_the_answer_is_relayed() {
    use std::io::{Read, Write};
    let release = Event::new();
    let rel = release.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        if req.method == "DELETE" {
            return Reply::Script(vec![
                Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nde".to_vec()),
                Step::Await(rel.clone()),
                Step::Write(b"ld".to_vec()),
            ]);
        }
        let body = format!("v{}", n2.fetch_add(1, Ordering::SeqCst) + 1);
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/inv").text(), "v1");
    assert!(status_of(&get(gw.addr, "/inv")).contains("hit"));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"DELETE /inv HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .unwrap();
    // The client has the answer's head; its body is still on its way.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut buf).expect("the DELETE's answer begins");
        assert!(k > 0, "{got:?}");
        got.extend_from_slice(&buf[..k]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    let r = get(gw.addr, "/inv");
    assert_eq!(r.text(), "v2", "{r:?}");
    release.set();
    while !got.ends_with(b"deld") {
        let k = s.read(&mut buf).expect("the rest of the DELETE's answer");
        assert!(k > 0, "{got:?}");
        got.extend_from_slice(&buf[..k]);
    }
}

#[test]
fn coalescing_100_concurrent_misses_make_1_upstream_request() {
    let up = Upstream::start(|_| Reply::Slow {
        parts: vec![(
            Duration::from_millis(300),
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 5\r\n\r\nhello"
                .to_vec(),
        )],
        close: false,
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let addr = gw.addr;
    let barrier = Arc::new(Barrier::new(100));
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                b.wait();
                c.send(b"GET /co HTTP/1.1\r\nHost: test.local\r\n\r\n");
                c.read_response().expect("a response")
            })
        })
        .collect();
    let mut collapsed = 0;
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        if status_of(&r).contains("collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(up.hits(), 1, "one fetch for 100 concurrent misses");
    assert!(collapsed >= 90, "{collapsed} collapsed");
}

#[test]
fn coalescing_waiters_take_over_when_the_fetch_is_not_storable() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_| {
        n2.fetch_add(1, Ordering::SeqCst);
        Reply::Slow {
            parts: vec![(
                Duration::from_millis(200),
                b"HTTP/1.1 200 OK\r\ncache-control: private\r\ncontent-length: 2\r\n\r\nme"
                    .to_vec(),
            )],
            close: false,
        }
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let addr = gw.addr;
    let hs: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || get(addr, "/pv")))
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap().text(), "me");
    }
    // Not shared: every request got its own answer.
    assert_eq!(n.load(Ordering::SeqCst), 5);
}

#[test]
fn eviction_keeps_each_worker_within_its_byte_budget() {
    let up = Upstream::start(|req| {
        let body = vec![b'x'; 10 * 1024];
        let mut v = format!(
            "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\nx-t: {}\r\ncontent-length: {}\r\n\r\n",
            req.target,
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(&body);
        Reply::Raw(v)
    });
    let gw = TestGateway::start(
        &cache_config(
            up.addr,
            "",
            "[cache]\nmax_bytes_per_worker = \"64KiB\"\nmax_object_bytes = \"16KiB\"\n",
        ),
        D,
    );
    for i in 0..40 {
        assert_eq!(get(gw.addr, &format!("/e{i}")).body.len(), 10 * 1024);
    }
    let stats = ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2)).unwrap();
    assert!(stats[0].bytes <= 64 * 1024, "{stats:?}");
    assert!(stats[0].entries >= 2 && stats[0].entries < 40, "{stats:?}");
    assert_eq!(stats[0].stores, 40);
}

#[test]
fn bodies_over_max_object_bytes_stream_through_without_being_stored() {
    let up = Upstream::start(|_| {
        let body = vec![b'y'; 40 * 1024];
        let mut v = format!(
            "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(&body);
        Reply::Raw(v)
    });
    let gw = TestGateway::start(
        &cache_config(up.addr, "max_object_bytes = \"16KiB\"", ""),
        D,
    );
    let r = get(gw.addr, "/big");
    assert_eq!(r.body.len(), 40 * 1024);
    assert!(status_of(&r).contains("detail=too-large"), "{r:?}");
    get(gw.addr, "/big");
    assert_eq!(up.hits(), 2);

    // Chunked bodies are captured as they stream, and dropped past the limit.
    let up = Upstream::start(|_| {
        let chunk = vec![b'z'; 8 * 1024];
        let mut v =
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        for _ in 0..3 {
            v.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            v.extend_from_slice(&chunk);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"0\r\n\r\n");
        Reply::Raw(v)
    });
    let gw = TestGateway::start(
        &cache_config(up.addr, "max_object_bytes = \"16KiB\"", ""),
        D,
    );
    assert_eq!(get(gw.addr, "/ch").body.len(), 24 * 1024);
    get(gw.addr, "/ch");
    assert_eq!(up.hits(), 2);
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/ch").body.len(), 24 * 1024);
    let r = get(gw.addr, "/ch");
    assert_eq!(r.body.len(), 24 * 1024);
    assert_eq!(r.header("content-length"), Some("24576"));
    assert_eq!(up.hits(), 3);
}

/// An origin that answers with its request target (`GET /q?a=1` -> body `/q?a=1`), max-age=60.
fn target_origin() -> Upstream {
    Upstream::start(|req| {
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: {}\r\n\r\n{}",
                req.target.len(),
                req.target
            )
            .into_bytes(),
        )
    })
}

/// RFC 9111 §2 (the key covers what selects the response) against parameter cloaking: with a
/// query allowlist, a parameter whose name decodes to a listed one (`%61` is `a`) is keyed
/// too, so `?a=1&%61=evil` (an origin that decodes names and takes the last `a` answers
/// `evil`) is not stored under the key of `?a=1`; and parameters of one name keep their
/// order in the key (`?a=1&a=2` and `?a=2&a=1` are answered differently by an origin that
/// reads the first or the last).
#[test]
fn rfc9111_2_a_query_allowlist_keys_encoded_names_and_keeps_the_order_of_repeats() {
    let up = target_origin();
    let gw = TestGateway::start(
        &cache_config(up.addr, "key = { query = [\"a\", \"b\", \"j\"] }", ""),
        D,
    );
    // Cloaked: a key of its own, not the plain URL's.
    assert_eq!(get(gw.addr, "/q?a=1&%61=evil").text(), "/q?a=1&%61=evil");
    assert_eq!(get(gw.addr, "/q?a=1").text(), "/q?a=1");
    assert_eq!(up.hits(), 2);
    // Lower-case hex too (`%6a` is `j`); a `%` that escapes nothing stands for itself (an
    // unlisted name: the plain URL's entry).
    assert_eq!(get(gw.addr, "/q?a=1&%6a=x").text(), "/q?a=1&%6a=x");
    assert_eq!(up.hits(), 3);
    assert_eq!(get(gw.addr, "/q?a=1&%zz=x").text(), "/q?a=1");
    assert_eq!(up.hits(), 3);
    // Unlisted names (also encoded ones) stay out of the key; listed ones sort by name.
    let r = get(gw.addr, "/q?b=2&z=9&a=1&%7a=8");
    assert_eq!(r.text(), "/q?b=2&z=9&a=1&%7a=8");
    assert_eq!(up.hits(), 4);
    let r = get(gw.addr, "/q?a=1&b=2");
    assert!(status_of(&r).contains("hit"), "{r:?}");
    assert_eq!(r.text(), "/q?b=2&z=9&a=1&%7a=8");
    // Repeats keep their order.
    assert_eq!(get(gw.addr, "/q?a=1&a=2").text(), "/q?a=1&a=2");
    assert_eq!(get(gw.addr, "/q?a=2&a=1").text(), "/q?a=2&a=1");
    assert_eq!(up.hits(), 6);
    assert_eq!(get(gw.addr, "/q?a=2&x=0&a=1").text(), "/q?a=2&a=1");
    assert_eq!(up.hits(), 6);
}

/// RFC 9111 §4.4 on a route whose key reads the query in part: an unsafe request to a URL
/// invalidates what a `GET` of that URL would be answered with, though it was stored by
/// another URL of the same key (other unlisted parameters, another order; with `query =
/// "none"`, any query). Before, an object kept the URL of the request that stored it, the
/// invalidation named the unsafe request's, and the next `GET` got the copy from before the
/// write (`POST /k?a=1&b=2` left `/k?b=2&a=1&utm=x`'s answer to `GET /k?a=1&b=2`). The
/// admin API's purge by URL names the URL as the key reads it (the listed parameters sorted).
#[test]
fn rfc9111_4_4_an_unsafe_request_invalidates_what_its_url_s_key_holds_when_the_key_drops_query_parts(
) {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let toml = format!(
        "{}\n[admin]\naddress = \"127.0.0.1:0\"\n",
        config(
            &[up.addr],
            "[[routes]]\nname = \"some\"\npath_prefix = \"/k\"\nupstream = \"up\"\n\
             cache = { key = { query = [\"b\", \"a\"] } }\n\
             [[routes]]\nname = \"none\"\npath_prefix = \"/n\"\nupstream = \"up\"\n\
             cache = { key = { query = \"none\" } }\n",
        )
    );
    let gw = TestGateway::start(&toml, D);
    let post = |path: &str| {
        request(
            gw.addr,
            format!("POST {path} HTTP/1.1\r\nHost: test.local\r\nContent-Length: 1\r\n\r\nx")
                .as_bytes(),
        )
    };
    // An allowlist: stored by one URL, answering another of the same key.
    miss(&get(gw.addr, "/k?b=2&a=1&utm=x"), "v1");
    hit(&get(gw.addr, "/k?a=1&b=2"), "v1");
    assert_eq!(post("/k?a=1&b=2").status, 200);
    miss(&get(gw.addr, "/k?a=1&b=2"), "v3");
    hit(&get(gw.addr, "/k?utm=y&b=2&a=1"), "v3");
    // No query in the key.
    miss(&get(gw.addr, "/n/x?page=1"), "v4");
    hit(&get(gw.addr, "/n/x"), "v4");
    assert_eq!(post("/n/x?other=2").status, 200);
    miss(&get(gw.addr, "/n/x?page=3"), "v6");
    // The admin API purges by the URL as the key reads it.
    let api = gw.gateway().admin_addr().expect("the admin API runs");
    let r = request(
        api,
        b"POST /cache/purge?url=test.local/k?a=1%26b=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("\"purged\": 1"), "{r:?}");
    miss(&get(gw.addr, "/k?b=2&a=1"), "v7");
}

/// RFC 9111 §4.4 on a `key.ignore_host` route: one stored copy answers every host, so a write
/// through any host invalidates it, and the admin API's purge by URL or prefix under any host
/// finds it (its objects are stored without a host). Before, the copy kept the host it was
/// stored through, and a `POST` through another host left it to answer.
#[test]
fn rfc9111_4_4_a_write_through_any_host_invalidates_an_ignore_host_route_s_copy() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let toml = format!(
        "{}\n[admin]\naddress = \"127.0.0.1:0\"\n",
        cache_config(up.addr, "key = { ignore_host = true }", "")
    );
    let gw = TestGateway::start(&toml, D);
    let on = |method: &str, host: &str, path: &str| {
        let body = if method == "POST" {
            "Content-Length: 1\r\n\r\nx"
        } else {
            "\r\n"
        };
        request(
            gw.addr,
            format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{body}").as_bytes(),
        )
    };
    miss(&on("GET", "one.test", "/x"), "v1");
    hit(&on("GET", "two.test", "/x"), "v1");
    assert_eq!(on("POST", "two.test", "/x").status, 200);
    miss(&on("GET", "one.test", "/x"), "v3");
    hit(&on("GET", "two.test", "/x"), "v3");
    let api = gw.gateway().admin_addr().expect("the admin API runs");
    let admin = |q: &str| {
        let r = request(
            api,
            format!(
                "POST /cache/purge?{q} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.text().contains("\"purged\": 1"), "{q}: {r:?}");
    };
    admin("url=three.test/x");
    miss(&on("GET", "two.test", "/x"), "v4");
    admin("prefix=one.test/");
    miss(&on("GET", "two.test", "/x"), "v5");
}

/// RFC 9111 §4.4 across routes: a write through a route of its own (`methods = ["POST"]`,
/// with the default key) invalidates the copy a cached route whose key keeps only some
/// parameters stored for that URL, whatever order the parameters came in.
#[test]
fn rfc9111_4_4_a_write_through_another_route_invalidates_a_query_keyed_route_s_copy() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let toml = config(
        &[up.addr],
        "[[routes]]\nname = \"writes\"\npath_prefix = \"/k\"\nmethods = [\"POST\"]\n\
         upstream = \"up\"\ncache = { }\n\
         [[routes]]\nname = \"reads\"\npath_prefix = \"/k\"\nupstream = \"up\"\n\
         cache = { key = { query = [\"a\", \"b\"] } }\n",
    );
    let gw = TestGateway::start(&toml, D);
    miss(&get(gw.addr, "/k?b=2&a=1"), "v1");
    hit(&get(gw.addr, "/k?b=2&a=1&utm=z"), "v1");
    let r = request(
        gw.addr,
        b"POST /k?b=2&a=1 HTTP/1.1\r\nHost: test.local\r\nContent-Length: 1\r\n\r\nx",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(status_of(&r).contains("fwd=method"), "{r:?}");
    miss(&get(gw.addr, "/k?b=2&a=1"), "v3");
}

fn auth_cache_config(up: SocketAddr, cache: &str) -> String {
    config(
        &[up],
        &format!(
            "[auth.api_key]\nheader = \"x-api-key\"\n\
             [[consumers]]\nname = \"alice\"\napi_keys = [\"{}\"]\n\
             [[consumers]]\nname = \"bob\"\napi_keys = [\"{}\"]\n\
             [[routes]]\nupstream = \"up\"\nauth = \"api_key\"\ncache = {{ {cache} }}\n",
            key_hash_hex(b"alice-key"),
            key_hash_hex(b"bob-key"),
        ),
    )
}

#[test]
fn auth_routes_key_entries_by_consumer_unless_the_response_is_public() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&auth_cache_config(up.addr, ""), D);
    assert_eq!(
        get_h(gw.addr, "/me", "x-api-key: alice-key\r\n").text(),
        "v1"
    );
    assert_eq!(get_h(gw.addr, "/me", "x-api-key: bob-key\r\n").text(), "v2");
    assert_eq!(
        get_h(gw.addr, "/me", "x-api-key: alice-key\r\n").text(),
        "v1"
    );
    assert_eq!(get(gw.addr, "/me").status, 401);

    let (up, _) = counting_origin("cache-control: public, max-age=60\r\n");
    let gw = TestGateway::start(&auth_cache_config(up.addr, ""), D);
    assert_eq!(
        get_h(gw.addr, "/all", "x-api-key: alice-key\r\n").text(),
        "v1"
    );
    assert_eq!(
        get_h(gw.addr, "/all", "x-api-key: bob-key\r\n").text(),
        "v1"
    );
}

/// RFC 9111 §4.1: the selecting header fields are those of the request as forwarded. The
/// origin varies on the consumer header, which the gateway sets (a client's copy is removed):
/// the stored variant is chosen by the value sent upstream, not by the client's (absent, or
/// spoofed) one, so bob never gets alice's answer (review r4 D2).
#[test]
fn rfc9111_4_1_vary_on_the_consumer_header_uses_the_value_sent_upstream() {
    let (up, _) = counting_origin("cache-control: public, max-age=60\r\nvary: x-consumer\r\n");
    let gw = TestGateway::start(&auth_cache_config(up.addr, ""), D);
    let alice = "x-api-key: alice-key\r\n";
    let bob = "x-api-key: bob-key\r\n";
    assert_eq!(get_h(gw.addr, "/v", alice).text(), "v1");
    assert_eq!(up.last().header("x-consumer"), Some("alice"));
    assert_eq!(get_h(gw.addr, "/v", bob).text(), "v2");
    assert_eq!(up.last().header("x-consumer"), Some("bob"));
    assert_eq!(get_h(gw.addr, "/v", alice).text(), "v1");
    // A spoofed copy is removed before forwarding, and does not select alice's variant.
    let spoofed = "x-api-key: bob-key\r\nx-consumer: alice\r\n";
    assert_eq!(get_h(gw.addr, "/v", spoofed).text(), "v2");
    let r = get_h(gw.addr, "/v", bob);
    assert_eq!(r.text(), "v2");
    assert!(status_of(&r).contains("hit"), "{}", status_of(&r));
    assert_eq!(up.hits(), 2);
}

/// A cache route named "r" in front of `up` with `request_headers = { rules }`.
fn rewriting_config(up: SocketAddr, rules: &str) -> String {
    config(
        &[up],
        &format!(
            "[[routes]]\nname = \"r\"\nupstream = \"up\"\nrequest_headers = {{ {rules} }}\ncache = {{ }}\n"
        ),
    )
}

/// RFC 9111 §4.1: the selecting header fields are those of the request as forwarded. A header
/// the route sets, removes or adds (`request_headers`) is compared as the gateway sends it,
/// when the response is stored and when it is looked up, never as the client sent it: clients
/// whose requests reach the origin alike share a variant, and after a reload that sets
/// another value the variant stored for the old one is not served.
#[test]
fn rfc9111_4_1_vary_on_a_header_the_route_rewrites_uses_the_value_sent_upstream() {
    // `set`: the client's value never reaches the origin.
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: x-tenant\r\n");
    let set = |t: &str| rewriting_config(up.addr, &format!("set = {{ x-tenant = \"{t}\" }}"));
    let gw = TestGateway::start(&set("acme"), D);
    assert_eq!(get_h(gw.addr, "/s", "x-tenant: evil\r\n").text(), "v1");
    assert_eq!(up.last().headers_named("x-tenant"), vec!["acme"]);
    hit(&get_h(gw.addr, "/s", ""), "v1");
    hit(&get_h(gw.addr, "/s", "x-tenant: other\r\n"), "v1");
    gw.gateway()
        .reload(ringway::config::Config::parse(&set("globex"), "c.toml").expect("valid"))
        .expect("reloads");
    let r = get_h(gw.addr, "/s", "x-tenant: evil\r\n");
    assert_eq!(r.text(), "v2", "{r:?}");
    assert!(status_of(&r).contains("fwd=vary-miss"), "{r:?}");
    assert_eq!(up.last().headers_named("x-tenant"), vec!["globex"]);
    assert_eq!(up.hits(), 2);
    // `remove`: the origin sees none, whatever the client sent.
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: x-tenant\r\n");
    let gw = TestGateway::start(&rewriting_config(up.addr, "remove = [\"x-tenant\"]"), D);
    assert_eq!(get_h(gw.addr, "/r", "x-tenant: a\r\n").text(), "v1");
    assert_eq!(up.last().header("x-tenant"), None);
    hit(&get_h(gw.addr, "/r", "x-tenant: b\r\n"), "v1");
    hit(&get_h(gw.addr, "/r", ""), "v1");
    assert_eq!(up.hits(), 1);
    // `add`: the client's lines, then the route's.
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: x-tier\r\n");
    let gw = TestGateway::start(&rewriting_config(up.addr, "add = { x-tier = \"gold\" }"), D);
    assert_eq!(get_h(gw.addr, "/a", "").text(), "v1");
    assert_eq!(up.last().headers_named("x-tier"), vec!["gold"]);
    let r = get_h(gw.addr, "/a", "x-tier: silver\r\n");
    assert_eq!(r.text(), "v2", "{r:?}");
    assert_eq!(up.last().headers_named("x-tier"), vec!["silver", "gold"]);
    hit(&get_h(gw.addr, "/a", "x-tier: silver\r\n"), "v2");
    hit(&get_h(gw.addr, "/a", ""), "v1");
    assert_eq!(up.hits(), 2);
}

/// RFC 9111 §4.1: the selecting fields are the request's as forwarded, also for fields the
/// client's `Connection` lists (RFC 9110 §7.6.1: the gateway drops them) and fields this hop
/// writes itself (`X-Forwarded-*`, `Forwarded`: an untrusted client's lines are replaced).
/// Before, the client's lines were compared: `Accept-Language: fr` with `Connection:
/// accept-language` stored the origin's answer to a request without the field as the French
/// variant, served to everyone who then sent `fr` (cache poisoning).
#[test]
fn rfc9111_4_1_vary_on_fields_the_gateway_drops_or_writes_uses_the_values_sent_upstream() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: accept-language\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let listed = "accept-language: fr\r\nconnection: accept-language\r\n";
    miss(&get_h(gw.addr, "/c", listed), "v1");
    assert_eq!(up.last().header("accept-language"), None);
    // The origin made v1 for a request without the field: not the French variant.
    miss(&get_h(gw.addr, "/c", "accept-language: fr\r\n"), "v2");
    assert_eq!(up.last().headers_named("accept-language"), vec!["fr"]);
    hit(&get_h(gw.addr, "/c", "accept-language: fr\r\n"), "v2");
    // A request without the field reaches the origin as the first did: it shares v1.
    hit(&get_h(gw.addr, "/c", ""), "v1");
    hit(&get_h(gw.addr, "/c", listed), "v1");
    assert_eq!(up.hits(), 2);

    // Written by this hop: an untrusted client's `X-Forwarded-For` and `X-Forwarded-Proto`
    // never reach the origin, which gets this hop's values (the same for every client here).
    let (up, _) = counting_origin(
        "cache-control: max-age=60\r\nvary: x-forwarded-for, x-forwarded-proto\r\n",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let spoofed = "x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: https\r\n";
    miss(&get_h(gw.addr, "/f", spoofed), "v1");
    assert_eq!(
        up.last().headers_named("x-forwarded-for"),
        vec!["127.0.0.1"]
    );
    assert_eq!(up.last().headers_named("x-forwarded-proto"), vec!["http"]);
    hit(&get_h(gw.addr, "/f", ""), "v1");
    hit(&get_h(gw.addr, "/f", "x-forwarded-proto: ftp\r\n"), "v1");
    assert_eq!(up.hits(), 1);

    // The request id: the client's when it sent a valid one, else one made per request,
    // never another request's; the trace parent names a new span per request.
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: x-request-id\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    miss(&get_h(gw.addr, "/i", "x-request-id: same\r\n"), "v1");
    hit(&get_h(gw.addr, "/i", "x-request-id: same\r\n"), "v1");
    miss(&get_h(gw.addr, "/i", ""), "v2");
    miss(&get_h(gw.addr, "/i", ""), "v3");
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: traceparent\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let tp = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";
    miss(&get_h(gw.addr, "/t", tp), "v1");
    miss(&get_h(gw.addr, "/t", tp), "v2");
    assert_eq!(up.hits(), 2);
}

/// A route's `key.headers` are keyed as the request goes upstream, as Vary compares them
/// (RFC 9111 §4.1, RFC 9110 §7.6.1): a field the client's `Connection` lists never reaches the
/// origin, so `Accept-Language: fr` with `Connection: accept-language` is keyed as a request
/// without the field (before, it stored the origin's answer to no field under `fr`, served to
/// everyone sending `fr`); a field the hop writes is keyed by the value it sends.
#[test]
fn key_headers_are_the_values_sent_upstream() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let key = "key = { headers = [\"accept-language\", \"x-forwarded-proto\"] }";
    let gw = TestGateway::start(&cache_config(up.addr, key, ""), D);
    let listed = "accept-language: fr\r\nconnection: accept-language\r\n";
    assert_eq!(get_h(gw.addr, "/k", listed).text(), "v1");
    assert_eq!(up.last().header("accept-language"), None);
    let r = get_h(gw.addr, "/k", "accept-language: fr\r\n");
    assert_eq!(r.text(), "v2", "{r:?}");
    hit(&get_h(gw.addr, "/k", "accept-language: fr\r\n"), "v2");
    hit(&get_h(gw.addr, "/k", ""), "v1");
    // An untrusted client's X-Forwarded-Proto is replaced by this hop's (`http` here).
    hit(&get_h(gw.addr, "/k", "x-forwarded-proto: https\r\n"), "v1");
    assert_eq!(up.hits(), 2);
}

/// RFC 9111 §4.1: `Host` is compared as it goes upstream, also when the route sends the
/// endpoint's address (`preserve_host = false`): before, it read as an empty field there, so a
/// response that varies on `Host`, or a route keyed on it (`key.headers`), kept serving what
/// one endpoint answered for its own address after a reload sent the route to another.
#[test]
fn rfc9111_4_1_host_under_vary_or_in_the_key_is_the_endpoint_s_address_when_sent() {
    // Answers with the Host it got.
    let origin = |vary: &'static str| {
        Upstream::start(move |req| {
            let host = req.header("host").unwrap_or("").to_string();
            Reply::Raw(
                format!(
                    "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n{vary}content-length: {}\r\n\r\n{host}",
                    host.len()
                )
                .into_bytes(),
            )
        })
    };
    for (vary, cache) in [
        ("vary: host\r\n", ""),
        ("", "key = { headers = [\"host\"] }"),
    ] {
        let (a, b) = (origin(vary), origin(vary));
        let cfg = |up: SocketAddr| {
            config(
                &[up],
                &format!(
                    "[[routes]]\nname = \"r\"\nupstream = \"up\"\npreserve_host = false\ncache = {{ {cache} }}\n"
                ),
            )
        };
        let gw = TestGateway::start(&cfg(a.addr), D);
        miss(&get(gw.addr, "/h"), &a.addr.to_string());
        hit(&get(gw.addr, "/h"), &a.addr.to_string());
        gw.gateway()
            .reload(ringway::config::Config::parse(&cfg(b.addr), "c.toml").expect("valid"))
            .expect("reloads");
        // The origin now gets another Host: what it answered for the old one is not this.
        let r = get(gw.addr, "/h");
        miss(&r, &b.addr.to_string());
        hit(&get(gw.addr, "/h"), &b.addr.to_string());
        assert_eq!((a.hits(), b.hits()), (1, 1), "{cache}");
    }
}

#[test]
fn purge_method_removes_urls_prefixes_and_tags_hard_and_soft() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let tag = if req.target.starts_with("/t/") {
            "tagged"
        } else {
            "other"
        };
        let body = format!("v{i}");
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: public, max-age=60\r\netag: \"{i}\"\r\nsurrogate-key: {tag} all\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&auth_cache_config(up.addr, "purge = true"), D);
    let key = "x-api-key: alice-key\r\n";
    let g = |p: &str| get_h(gw.addr, p, key).text();
    let purge = |target: &str, extra: &str| {
        request(
            gw.addr,
            format!("PURGE {target} HTTP/1.1\r\nHost: test.local\r\n{key}{extra}\r\n").as_bytes(),
        )
    };
    assert_eq!(g("/a"), "v1");
    assert_eq!(g("/a"), "v1");
    // Without credentials PURGE is refused by the route's auth policy.
    let r = request(gw.addr, b"PURGE /a HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert_eq!(r.status, 401);
    // Exact URL.
    let r = purge("/a", "");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("\"purged\":1"), "{}", r.text());
    assert_eq!(g("/a"), "v2");
    // Prefix.
    assert_eq!(g("/p/1"), "v3");
    assert_eq!(g("/p/2"), "v4");
    purge("/p/*", "");
    assert_eq!(g("/p/1"), "v5");
    assert_eq!(g("/p/2"), "v6");
    // Surrogate key.
    assert_eq!(g("/t/1"), "v7");
    assert_eq!(g("/a"), "v2");
    purge("/", "surrogate-key: tagged\r\n");
    assert_eq!(g("/t/1"), "v8");
    assert_eq!(g("/a"), "v2");
    // Soft: marked stale, then validated (the origin sees the stored validator).
    let r = purge("/a", "purge-mode: soft\r\n");
    assert!(r.text().contains("soft"));
    assert_eq!(g("/a"), "v9");
    assert_eq!(up.last().header("if-none-match"), Some("\"2\""));
}

/// The demo (`config/demo.toml`, `ringway demo`) shows the route-level purge: `PURGE` on the
/// cached users' paths, for the `ops` consumer's key only. Run here with its addresses moved
/// to ports from the kernel and its users service replaced by a counting one that says
/// `max-age=60` (the sample service says `max-age=30`: `src/demo.rs`). Before, the demo had no
/// purge: a PURGE went to the users service as an unknown method.
#[test]
fn the_demo_config_purges_the_cached_users_with_the_ops_key() {
    let (up, n) = counting_origin("cache-control: max-age=60\r\n");
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
        .expect("config/demo.toml");
    let mut toml = demo
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace(
            "[access_log]\nenabled = true",
            "[access_log]\nenabled = false",
        );
    for port in ["9101", "9102", "9103"] {
        toml = toml.replace(&format!("127.0.0.1:{port}"), &up.addr.to_string());
    }
    let gw = TestGateway::start(&toml, D);
    let send = |method: &str, key: Option<&str>| {
        let key = key
            .map(|k| format!("x-api-key: {k}\r\n"))
            .unwrap_or_default();
        request(
            gw.addr,
            format!("{method} /cached/users/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}\r\n").as_bytes(),
        )
    };
    assert_eq!(send("GET", None).text(), "v1");
    let r = send("GET", None);
    assert_eq!(r.text(), "v1", "{r:?}");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    assert_eq!(send("PURGE", None).status, 401);
    assert_eq!(send("PURGE", Some("another-key")).status, 401);
    let r = send("PURGE", Some("demo-ops-key"));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("\"purged\":1"), "{}", r.text());
    assert_eq!(n.load(Ordering::SeqCst), 1, "the PURGE went to no upstream");
    assert!(up.targets().iter().all(|t| t == "/users/1"));
    assert_eq!(send("GET", None).text(), "v2");
}

/// Read access is not purge access: with `purge = ["alice"]` only that consumer may PURGE;
/// another that the route's auth lets read gets 403 and the entry stays.
#[test]
fn purge_rights_can_be_narrowed_to_named_consumers() {
    let (up, _) = counting_origin("cache-control: public, max-age=60\r\n");
    let gw = TestGateway::start(&auth_cache_config(up.addr, "purge = [\"alice\"]"), D);
    let as_ = |who: &str| format!("x-api-key: {who}-key\r\n");
    let purge = |who: &str| {
        request(
            gw.addr,
            format!("PURGE /a HTTP/1.1\r\nHost: test.local\r\n{}\r\n", as_(who)).as_bytes(),
        )
    };
    assert_eq!(get_h(gw.addr, "/a", &as_("bob")).text(), "v1");
    let r = purge("bob");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"], "purge_forbidden");
    assert!(status_of(&r).contains("detail=purge-forbidden"), "{r:?}");
    assert_eq!(
        get_h(gw.addr, "/a", &as_("bob")).text(),
        "v1",
        "still stored"
    );
    let r = purge("alice");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("\"purged\":1"), "{}", r.text());
    assert_eq!(get_h(gw.addr, "/a", &as_("bob")).text(), "v2");

    // The list names consumers that exist, and someone.
    for (purge, why) in [("[]", "empty list"), ("[\"carol\"]", "no consumer named")] {
        let e = ringway::config::Config::parse(
            &auth_cache_config(up.addr, &format!("purge = {purge}")),
            "c.toml",
        )
        .unwrap_err();
        assert_eq!(e.key, "routes[0].cache.purge", "{e}");
        assert!(e.reason.contains(why), "{e}");
    }
}

/// RFC 9110 §4.2.3 and §7.2, RFC 3986 §6.2.3: a URI's scheme's default port, or an empty
/// port, is the same origin as no port. On a plain listener `Host: a.test:80`, `Host:
/// a.test:`, `Host: a.test` and the absolute forms `http://a.test:80/k` and `http://a.test/k`
/// are one key: one stored object, and a purge through any spelling removes it. Another port
/// (`:8080`, or `:443` over plain HTTP) is another origin. Before, each spelling was a key of
/// its own: a second copy fetched and stored, and a purge of one left the other.
#[test]
fn rfc9110_4_2_3_the_default_port_is_one_key_with_no_port_stored_and_purged_once() {
    let (up, n) = counting_origin("cache-control: public, max-age=60\r\n");
    let gw = TestGateway::start(&auth_cache_config(up.addr, "purge = true"), D);
    let key = "x-api-key: alice-key\r\n";
    let send = |target: &str, host: &str| {
        request(
            gw.addr,
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{key}\r\n").as_bytes(),
        )
        .text()
    };
    assert_eq!(send("/k", "a.test"), "v1");
    assert_eq!(send("/k", "a.test:80"), "v1", "the default port");
    assert_eq!(send("/k", "a.test:"), "v1", "an empty port");
    assert_eq!(send("/k", "A.test.:80"), "v1");
    assert_eq!(send("http://a.test:80/k", "a.test"), "v1", "absolute-form");
    assert_eq!(send("http://a.test/k", "a.test:80"), "v1");
    assert_eq!(n.load(Ordering::SeqCst), 1);
    // Other ports are other origins.
    assert_eq!(send("/k", "a.test:8080"), "v2");
    assert_eq!(send("/k", "a.test:443"), "v3", "443 is not http's default");
    assert_eq!(
        send("/k", "a.test:080"),
        "v1",
        "port 80 with a leading zero"
    );
    let stats = ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2)).unwrap();
    assert_eq!(stats.iter().map(|s| s.entries).sum::<u64>(), 3);
    // One purge through the default port's spelling removes the one object.
    let r = request(
        gw.addr,
        format!("PURGE /k HTTP/1.1\r\nHost: a.test:80\r\n{key}\r\n").as_bytes(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("\"purged\":1"), "{}", r.text());
    assert_eq!(send("/k", "a.test:80"), "v4");
    // And stored via `:80`, purged via no port.
    let r = request(
        gw.addr,
        format!("PURGE http://a.test/k HTTP/1.1\r\nHost: a.test\r\n{key}\r\n").as_bytes(),
    );
    assert!(r.text().contains("\"purged\":1"), "{}", r.text());
    assert_eq!(send("/k", "a.test"), "v5");
    // A purge by URL from the admin side, which names no scheme: either default port is.
    for host in ["a.test:80", "a.test:443"] {
        let hit = ringway::cache::purge(
            gw.gateway().control(),
            Purge {
                target: PurgeTarget::Url(ringway::cache::purge_url(host, "/k")),
                soft: false,
            },
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(hit.iter().sum::<u64>(), 1, "{host}");
        let before = n.load(Ordering::SeqCst);
        send("/k", "a.test");
        assert_eq!(
            n.load(Ordering::SeqCst),
            before + 1,
            "{host}: purged before"
        );
    }
}

/// RFC 9110 §4.2.3 for purges that name no scheme: `a.test:443/x` is either
/// `https://a.test/x` (keyed `a.test/x`) or `http://a.test:443/x` (keyed apart, another origin),
/// so an admin purge of it without a scheme removes both; `a.test:80/x` likewise (`http`'s
/// default, or `https://a.test:80`). With a scheme it names one origin and removes that one
/// only. Before, the scheme-less purge took either default port for no port and missed the
/// copy stored over plain HTTP under `:443`.
#[test]
fn rfc9110_4_2_3_an_admin_purge_without_a_scheme_reaches_both_origins_its_port_may_name() {
    let (up, n) = counting_origin("cache-control: max-age=60\r\n");
    let (gw, api) = gateway_with_admin(up.addr);
    let send = |host: &str| {
        request(
            gw.addr,
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
    };
    let purge = |url: &str| {
        let r = request(
            api,
            format!(
                "POST /cache/purge?url={url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["purged"].as_u64().unwrap()
    };
    // Plain HTTP: `a.test:443` is its own origin; `a.test:80` is `a.test`.
    let fill = || {
        for host in ["a.test", "a.test:443"] {
            send(host);
            assert!(status_of(&send(host)).contains("hit"), "{host}");
        }
    };
    for (url, purged) in [
        ("a.test:443/x", 2),
        ("a.test:80/x", 1),
        ("http://a.test:443/x", 1),
        ("https://a.test:443/x", 1),
        ("http://a.test/x", 1),
    ] {
        fill();
        let before = n.load(Ordering::SeqCst);
        assert_eq!(purge(url), purged, "{url}");
        // What the purge reached is fetched again.
        send("a.test");
        send("a.test:443");
        assert_eq!(n.load(Ordering::SeqCst), before + purged as usize, "{url}");
    }
}

/// RFC 9110 §4.2.3 behind a TLS-terminating proxy (`server.trusted_proxies`): the client's
/// scheme is the one the proxy says (`X-Forwarded-Proto`, else `Forwarded`'s `proto`, of the
/// client's hop: see the next test), so `Host: a.test:443` from it is the origin `https://a.test` and keys with
/// `a.test`. From an untrusted peer those fields say nothing, and `:443` over plain HTTP is
/// another origin. Before, the proxy's `:443` keyed apart from the same host without a port.
#[test]
fn rfc9110_4_2_3_behind_a_trusted_tls_proxy_443_is_the_default_port() {
    let (up, n) = counting_origin("cache-control: max-age=60\r\n");
    let send = |gw: &TestGateway, host: &str, fields: &str| {
        request(
            gw.addr,
            format!("GET /p HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n").as_bytes(),
        )
        .text()
    };
    let trusted = TestGateway::start(
        &cache_config(up.addr, "", "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n"),
        D,
    );
    assert_eq!(send(&trusted, "a.test", ""), "v1");
    assert_eq!(
        send(&trusted, "a.test:443", "x-forwarded-proto: https\r\n"),
        "v1"
    );
    assert_eq!(
        send(
            &trusted,
            "a.test:443",
            "forwarded: for=192.0.2.1;proto=https\r\n"
        ),
        "v1"
    );
    assert_eq!(
        send(&trusted, "a.test:443", "x-forwarded-proto: HTTPS\r\n"),
        "v1"
    );
    // Said http, or said nothing: `:443` over plain HTTP, another origin.
    assert_eq!(
        send(&trusted, "a.test:443", "x-forwarded-proto: http\r\n"),
        "v2"
    );
    assert_eq!(send(&trusted, "a.test:443", ""), "v2");
    // And `:80` from a proxy that says https is `https://a.test:80`, not `a.test`.
    assert_eq!(
        send(&trusted, "a.test:80", "x-forwarded-proto: https\r\n"),
        "v3"
    );
    assert_eq!(n.load(Ordering::SeqCst), 3);
    // An untrusted peer's word counts for nothing.
    let (up, n) = counting_origin("cache-control: max-age=60\r\n");
    let untrusted = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(send(&untrusted, "a.test", ""), "v1");
    assert_eq!(
        send(&untrusted, "a.test:443", "x-forwarded-proto: https\r\n"),
        "v2"
    );
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// RFC 7239 §4 and §8.1: proxies append their element (`Forwarded`, `X-Forwarded-For`,
/// `X-Forwarded-Proto`), so behind a trusted proxy the elements left of the ones it wrote may
/// be the client's own. The scheme is read from the client's hop as rate limiting finds the
/// client's address: from the right, the first element not written about a trusted proxy
/// (`Forwarded`'s `for`; for `X-Forwarded-Proto`, the item at the place of the client's
/// `X-Forwarded-For` element). Before, the first item was read: a client that sent its own
/// `X-Forwarded-Proto: https` or `Forwarded: proto=https` through an appending proxy chose
/// the https origin (RFC 9110 §4.2.3: `:443` then keyed as the default port).
#[test]
fn rfc7239_8_1_the_scheme_behind_trusted_proxies_is_the_client_hop_s_not_the_client_s_own() {
    let (up, n) = counting_origin("cache-control: max-age=60\r\n");
    let send = |gw: &TestGateway, fields: &str| {
        request(
            gw.addr,
            format!("GET /p HTTP/1.1\r\nHost: a.test:443\r\n{fields}\r\n").as_bytes(),
        )
        .text()
    };
    let gw = TestGateway::start(
        &cache_config(
            up.addr,
            "",
            "[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n",
        ),
        D,
    );
    // v1: `https://a.test` (keyed `a.test`); v2: `http://a.test:443`.
    assert_eq!(send(&gw, "x-forwarded-proto: https\r\n"), "v1");
    assert_eq!(send(&gw, "x-forwarded-proto: http\r\n"), "v2");
    for (fields, want) in [
        // The client's own item, then the proxy's: http.
        ("x-forwarded-proto: https, http\r\n", "v2"),
        (
            "x-forwarded-proto: https\r\nx-forwarded-proto: http\r\n",
            "v2",
        ),
        (
            "x-forwarded-for: 6.6.6.6, 192.0.2.1\r\nx-forwarded-proto: https, http\r\n",
            "v2",
        ),
        // Two trusted hops: the first (TLS) saw the client, the second saw it plainly.
        (
            "x-forwarded-for: 192.0.2.1, 10.0.0.5\r\nx-forwarded-proto: https, http\r\n",
            "v1",
        ),
        // A proxy that replaced the field: its one item.
        (
            "x-forwarded-for: 192.0.2.1, 10.0.0.5\r\nx-forwarded-proto: https\r\n",
            "v1",
        ),
        // Forwarded: the client's own element, then the proxy's.
        (
            "forwarded: for=6.6.6.6;proto=https, for=192.0.2.1;proto=http\r\n",
            "v2",
        ),
        (
            "forwarded: for=6.6.6.6;proto=https\r\nforwarded: for=192.0.2.1;proto=http\r\n",
            "v2",
        ),
        // ... the client's hop left of a trusted one's.
        (
            "forwarded: for=192.0.2.1;proto=https, for=10.0.0.5;proto=http\r\n",
            "v1",
        ),
        (
            "forwarded: for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.5;proto=http\r\n",
            "v1",
        ),
        // Every element a trusted proxy's: the leftmost.
        (
            "forwarded: for=10.0.0.6;proto=https, for=10.0.0.5;proto=http\r\n",
            "v1",
        ),
        // An element that names no address is the client's.
        (
            "forwarded: for=unknown;proto=http, for=10.0.0.5;proto=https\r\n",
            "v2",
        ),
    ] {
        assert_eq!(send(&gw, fields), want, "{fields}");
    }
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// RFC 9112 §3.2.2 and §3.3: an absolute-form target is the target URI, scheme included; a
/// trusted proxy's `X-Forwarded-Proto` (which rebuilds the URI of an origin-form target) does
/// not replace it in the key. The origin is told the proxy's scheme (its field passes on as
/// sent) or the connection's, never the target's, which the client chose: where the two make
/// the target's port (`:80`, `:443`) the default of one and not the other, the origin reads the
/// Host as another origin than the key names, so the request is forwarded, but not answered
/// from the store nor stored (`detail=target-scheme`). Before, the proxy's `https` won: the
/// origin `http://a.test:443` keyed as `a.test` and got `http://a.test`'s copy, and
/// `http://a.test:80` keyed apart from it.
#[test]
fn rfc9112_3_3_an_absolute_form_target_gives_the_scheme_behind_a_trusted_proxy() {
    let (up, n) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(
        &cache_config(up.addr, "", "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n"),
        D,
    );
    let send = |target: &str, fields: &str| {
        request(
            gw.addr,
            format!("GET {target} HTTP/1.1\r\nHost: a.test\r\n{fields}\r\n").as_bytes(),
        )
    };
    let https = "x-forwarded-proto: https\r\n";
    miss(&send("/p", ""), "v1");
    // No port: the scheme moves no default port, and the key names none.
    hit(&send("http://a.test/p", https), "v1");
    // `http://a.test:80` is `http://a.test`, and `http://a.test:443` another origin; the
    // origin, told https, would read `https://a.test:80` and `https://a.test`.
    for (target, body) in [("http://a.test:80/p", "v2"), ("http://a.test:443/p", "v3")] {
        let r = send(target, https);
        assert_eq!(r.text(), body, "{target}: {r:?}");
        assert!(
            status_of(&r).contains("fwd=bypass") && status_of(&r).contains("detail=target-scheme"),
            "{target}: {r:?}"
        );
        let told = up.last();
        assert_eq!(told.header("x-forwarded-proto"), Some("https"), "{target}");
        assert_eq!(
            told.header("host"),
            target[7..].split('/').next(),
            "{target}"
        );
    }
    // Nothing of theirs was stored: the proxy saying http, or nothing (ringway then tells
    // http itself), agrees with the target, and the store answers.
    hit(
        &send("http://a.test:80/p", "x-forwarded-proto: http\r\n"),
        "v1",
    );
    hit(&send("http://a.test:80/p", ""), "v1");
    assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
    // `https://a.test:443` is `https://a.test`, which the proxy's https agrees with; told
    // http (the proxy said nothing), the origin would read `http://a.test:443`.
    hit(&send("https://a.test:443/p", https), "v1");
    let r = send("https://a.test:443/p", "");
    assert_eq!(r.text(), "v4", "{r:?}");
    assert!(status_of(&r).contains("detail=target-scheme"), "{r:?}");
    assert_eq!(up.last().header("x-forwarded-proto"), Some("http"));
    assert_eq!(n.load(Ordering::SeqCst), 4);
}

/// RFC 9111 §4.4 with RFC 9112 §3.3: an unsafe method whose absolute-form target's scheme is
/// not the one the origin is told, where that moves the key (`POST http://a.test:443/p`, the
/// trusted proxy saying https: the origin changes `https://a.test/p`, keyed `a.test/p`),
/// invalidates the URL the origin reads as well as the target's, and so for its
/// `Content-Location`. Before, only `a.test:443/p` was invalidated, and the copy of
/// `https://a.test/p` the write changed kept being served.
#[test]
fn rfc9111_4_4_an_unsafe_method_with_a_target_scheme_split_invalidates_what_the_origin_read() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let body = format!("v{i}");
        let extra = if req.method != "GET" {
            "content-location: /c\r\n"
        } else {
            "cache-control: max-age=60\r\n"
        };
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\n{extra}content-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(
        &cache_config(up.addr, "", "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n"),
        D,
    );
    let https = "x-forwarded-proto: https\r\n";
    let get = |path: &str| {
        request(
            gw.addr,
            format!("GET {path} HTTP/1.1\r\nHost: a.test:443\r\n{https}\r\n").as_bytes(),
        )
    };
    // The proxy says https where the target says http, and says nothing (ringway tells http)
    // where it says https.
    for (method, target, fields) in [
        ("POST", "http://a.test:443/p", https),
        ("PUT", "https://a.test:80/p", ""),
    ] {
        // (`Host: a.test:443` told https: keyed `a.test`, as the proxy's client asked.)
        let p = get("/p");
        let c = get("/c");
        assert!(status_of(&get("/p")).contains("hit"), "{method}");
        assert!(status_of(&get("/c")).contains("hit"), "{method}");
        let r = request(
            gw.addr,
            format!(
                "{method} {target} HTTP/1.1\r\nHost: a.test\r\n{fields}content-length: 0\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 200, "{method} {target}: {r:?}");
        let (p2, c2) = (get("/p"), get("/c"));
        assert!(status_of(&p2).contains("fwd="), "{target}: {p2:?}");
        assert!(status_of(&c2).contains("fwd="), "{target}: {c2:?}");
        assert_ne!(p2.text(), p.text(), "{target}");
        assert_ne!(c2.text(), c.text(), "{target}");
    }
}

/// RFC 9110 §4.2.3 over TLS: `https`'s default port is 443, so on a TLS listener `Host:
/// a.test:443` and `Host: a.test` are one key, and `:80` there is another origin
/// (`https://a.test:80`).
#[test]
fn rfc9110_4_2_3_on_a_tls_listener_443_is_the_default_port() {
    use support::pki::{pki, provider, roots};
    let (up, n) = counting_origin("cache-control: public, max-age=60\r\n");
    let p = pki();
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}\n\
         [upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n\
         [[routes]]\nupstream = \"up\"\ncache = {{ }}\n",
        p.path("a-chain.pem"),
        p.path("a.key"),
        up.addr,
    );
    let gw = TestGateway::start(&toml, D);
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots("ca.pem"))
            .with_no_client_auth(),
    );
    let mut c = Client::connect_tls(gw.addr, "a.test", tls).expect("handshake");
    let mut send = |target: &str, host: &str| {
        c.send(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        c.read_response().expect("response").text()
    };
    assert_eq!(send("/k", "a.test"), "v1");
    assert_eq!(send("/k", "a.test:443"), "v1");
    assert_eq!(send("https://a.test:443/k", "a.test"), "v1");
    assert_eq!(send("/k", "a.test:80"), "v2", "80 is not https's default");
    // An absolute-form target names its own scheme (`http://a.test:80` is `http://a.test`,
    // keyed `a.test`), but the origin is told the connection's, https, and would read
    // `https://a.test:80`: forwarded, not looked up or stored (RFC 9112 §3.3, see
    // `rfc9112_3_3_an_absolute_form_target_gives_the_scheme_behind_a_trusted_proxy`).
    let mut send_status = |target: &str| {
        c.send(format!("GET {target} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes());
        let r = c.read_response().expect("response");
        (r.text(), status_of(&r))
    };
    let (body, status) = send_status("http://a.test:80/k");
    assert_eq!(body, "v3");
    assert!(status.contains("detail=target-scheme"), "{status}");
    assert_eq!(send_status("https://a.test/k").0, "v1");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}
/// RFC 9111 §4.4 with several workers: an unsafe method's invalidation reaches every
/// worker's store before its answer reaches the client. Before, the other workers applied it
/// at their next control tick (up to 50 ms later), and a GET sent at once that another worker
/// took got the invalidated copy (cache-tests `invalidate-PUT` with two workers).
#[test]
fn rfc9111_4_4_invalidation_reaches_every_worker_before_the_answer() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        if req.method == "DELETE" {
            return Reply::Raw(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec());
        }
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: {}\r\n\r\n{i}",
                i.to_string().len()
            )
            .into_bytes(),
        )
    });
    let toml = format!("[server]\nworkers = 2\n{}", cache_config(up.addr, "", ""));
    for d in DRIVERS {
        let gw = TestGateway::start(&toml, d);
        let control = gw.gateway().control();
        for round in 0..5 {
            let path = format!("/i{round}");
            let entries = || -> Vec<u64> {
                ringway::cache::stats(control, Duration::from_secs(2))
                    .unwrap()
                    .iter()
                    .map(|s| s.entries)
                    .collect()
            };
            // Stored on both workers (the kernel spreads connections; enough tries fill both).
            let base = entries();
            assert!(eventually(Duration::from_secs(10), || {
                get(gw.addr, &path);
                entries().iter().zip(&base).all(|(now, was)| now > was)
            }));
            let before = n.load(Ordering::SeqCst);
            let d = request(
                gw.addr,
                format!("DELETE {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes(),
            );
            assert_eq!(d.status, 204);
            // At once, on fresh connections (either worker): nothing from before the DELETE.
            for _ in 0..10 {
                let r = get(gw.addr, &path);
                let v: usize = r.text().parse().unwrap();
                assert!(v > before, "round {round}: {v} <= {before}: {r:?}");
            }
        }
    }
}

/// RFC 9111 §4.3.4 across workers: a 304 that one worker gets freshens the copies the other
/// workers hold too, so they do not revalidate what the origin has just confirmed.
#[test]
fn rfc9111_4_3_4_a_304_freshens_the_copies_of_the_other_workers() {
    let f_hits = Arc::new(AtomicUsize::new(0));
    let f2 = f_hits.clone();
    let up = Upstream::start(move |req| {
        if req.target.starts_with("/who/") {
            return Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 1\r\n\r\nw"
                    .to_vec(),
            );
        }
        f2.fetch_add(1, Ordering::SeqCst);
        if req.header("if-none-match") == Some("\"a\"") {
            return Reply::Raw(
                b"HTTP/1.1 304 Not Modified\r\ncache-control: max-age=600\r\netag: \"a\"\r\n\r\n"
                    .to_vec(),
            );
        }
        Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"a\"\r\ncontent-length: 2\r\n\r\nv1".to_vec())
    });
    let toml = format!("[server]\nworkers = 2\n{}", cache_config(up.addr, "", ""));
    for d in DRIVERS {
        f_hits.store(0, Ordering::SeqCst);
        let gw = TestGateway::start(&toml, d);
        let (mut x, mut y) = client_per_worker(&gw);
        let ask = |c: &mut Client| {
            c.send(b"GET /f HTTP/1.1\r\nHost: test.local\r\n\r\n");
            let r = c.read_response().expect("answer");
            assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{d:?}: {r:?}");
            r
        };
        // Both workers store the response, already stale (max-age=0).
        ask(&mut x);
        ask(&mut y);
        assert_eq!(f_hits.load(Ordering::SeqCst), 2);
        // Worker x revalidates: the 304 makes it fresh for 600 s, there and on y.
        ask(&mut x);
        assert_eq!(f_hits.load(Ordering::SeqCst), 3);
        // Jobs run in the order they were posted: once y answers this, it has the update.
        ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2)).unwrap();
        let r = ask(&mut y);
        assert!(status_of(&r).contains("hit"), "{d:?}: {r:?}");
        assert_eq!(
            f_hits.load(Ordering::SeqCst),
            3,
            "{d:?}: y revalidated what x had just confirmed"
        );
    }
}

#[test]
fn purge_api_reaches_every_worker() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let mut toml = cache_config(up.addr, "", "");
    toml.push_str("\n[server]\nworkers = 2\n");
    let toml = toml.replace("\n[server]\nworkers = 2\n", "");
    let toml = format!("[server]\nworkers = 2\n{toml}");
    let gw = TestGateway::start(&toml, D);
    // Fill both workers (connections are spread by the kernel; enough tries fill both).
    for _ in 0..20 {
        get(gw.addr, "/w");
    }
    let control = gw.gateway().control();
    let stats = ringway::cache::stats(control, Duration::from_secs(2)).unwrap();
    assert_eq!(stats.len(), 2);
    let stored: u64 = stats.iter().map(|s| s.entries).sum();
    assert!(stored >= 1);
    let hit = ringway::cache::purge(
        control,
        Purge {
            target: PurgeTarget::Url(ringway::cache::purge_url("test.local", "/w")),
            soft: false,
        },
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(hit.iter().sum::<u64>(), stored);
    let stats = ringway::cache::stats(control, Duration::from_secs(2)).unwrap();
    assert_eq!(stats.iter().map(|s| s.entries).sum::<u64>(), 0);
}

#[test]
fn cache_config_errors_name_the_key_and_line() {
    let bad = |extra: &str| {
        ringway::config::Config::parse(
            &format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n{extra}"),
            "c.toml",
        )
        .unwrap_err()
    };
    let e = bad("[cache]\nmax_variants = 0\n");
    assert_eq!(e.key, "cache.max_variants");
    assert_eq!(e.line, Some(6), "{e}");
    let e = bad("[[routes]]\nupstream = \"up\"\ncache = { purge = true }\n");
    assert_eq!(e.key, "routes[0].cache.purge");
    assert!(e.line.is_some(), "{e}");
    let e = bad("[[routes]]\nupstream = \"up\"\ncache = { key = { query = \"some\" } }\n");
    assert_eq!(e.key, "routes[0].cache.key.query");
    let e = bad("[[routes]]\nupstream = \"up\"\ncache = { ttl = \"1s\" }\n");
    assert!(e.reason.contains("unknown field"), "{e}");
    let e = bad("[cache]\nmax_object_bytes = \"2GiB\"\n");
    assert_eq!(e.key, "cache.max_object_bytes");
    // The in-flight bound holds at least one object of the largest size a route stores.
    let e = bad("[cache]\nmax_in_flight_bytes_per_worker = \"512KiB\"\n");
    assert_eq!(e.key, "cache.max_in_flight_bytes_per_worker");
    assert_eq!(e.line, Some(6), "{e}");
    let e = bad("[cache]\nmax_in_flight_bytes_per_worker = \"1MiB\"\n[[routes]]\nupstream = \"up\"\ncache = { max_object_bytes = \"2MiB\" }\n");
    assert_eq!(e.key, "routes[0].cache.max_object_bytes");
    // The purge log's length and the kept purges' retry waits.
    for (extra, key, why) in [
        (
            "purge_log_length = 0",
            "cache.redis.purge_log_length",
            "between 1 and 100000",
        ),
        (
            "purge_log_length = 100001",
            "cache.redis.purge_log_length",
            "between 1 and 100000",
        ),
        (
            "purge_retry_first = \"5ms\"",
            "cache.redis.purge_retry_first",
            "between 10ms and 1h",
        ),
        (
            "purge_retry_first = \"2h\"",
            "cache.redis.purge_retry_first",
            "between 10ms and 1h",
        ),
        (
            "purge_retry_max = \"500ms\"",
            "cache.redis.purge_retry_max",
            "at least purge_retry_first",
        ),
        (
            "purge_retry_first = \"2s\"\npurge_retry_max = \"1s\"",
            "cache.redis.purge_retry_max",
            "at least purge_retry_first",
        ),
        (
            "purge_retry_max = \"61m\"",
            "cache.redis.purge_retry_max",
            "at most 1h",
        ),
    ] {
        let e = bad(&format!(
            "[cache.redis]\naddress = \"127.0.0.1:9\"\n{extra}\n"
        ));
        assert_eq!(e.key, key, "{extra}");
        assert_eq!(e.file, "c.toml");
        assert!(e.line.is_some_and(|l| l >= 7), "{e}");
        assert!(e.reason.contains(why), "{e}");
    }
    ringway::config::Config::parse(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[cache.redis]\naddress = \"127.0.0.1:9\"\npurge_log_length = 100000\npurge_retry_first = \"10ms\"\npurge_retry_max = \"1h\"\n",
        "ok.toml",
    )
    .expect("in range");
}

/// `ringway check` warns of a `[cache.redis] max_entry_bytes` that no link to Redis moves
/// within `timeout` (an entry goes in one round and comes back in one reply, each within
/// `timeout`, and one the link cannot move in that time fails alone each time): 64 MiB in
/// 20 ms takes more than 1 GiB/s, where loopback moves about 0.7. A warning, not an error:
/// the config is valid and `check` succeeds. The default (1 MiB in 20 ms) and 64 MiB in
/// 100 ms say nothing. Before, nothing related the two keys.
#[test]
fn check_warns_of_a_redis_entry_bound_no_link_moves_within_the_timeout() {
    let src = |entry: &str, timeout: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n\
             [cache.redis]\naddress = \"127.0.0.1:9\"\ntimeout = \"{timeout}\"\nmax_entry_bytes = \"{entry}\"\n"
        )
    };
    let warnings = |entry: &str, timeout: &str| {
        ringway::config::Config::parse(&src(entry, timeout), "c.toml")
            .expect("a valid config")
            .warnings()
    };
    assert_eq!(warnings("1MiB", "20ms"), Vec::<String>::new());
    assert_eq!(warnings("64MiB", "100ms"), Vec::<String>::new());
    let w = warnings("64MiB", "20ms");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "cache.redis.max_entry_bytes: 64.0 MiB cannot be moved within `timeout` (20 ms)"
        ),
        "{w:?}"
    );

    let dir = std::env::temp_dir().join(format!("ringway-check-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cache.toml");
    std::fs::write(&file, src("64MiB", "20ms")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(["check", "-c"])
        .arg(&file)
        .env("RINGWAY_LOG", "off")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "a warning is not an error: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("ringway: warning: cache.redis.max_entry_bytes: "),
        "{stderr}"
    );
}

/// Waits (bounded) until a stored object has reached Redis: the write is queued so that no
/// client waits for it. Its URL's index set too (written by a command after the entry's,
/// possibly in a later round): a purge by URL finds the entry through it, so a test that cuts
/// the link right after the entry arrived could leave an entry no purge finds.
fn wait_stored_in_redis(redis: &RedisServer) {
    assert!(eventually(Duration::from_secs(5), || !redis
        .keys("ringway:cache:o:*")
        .is_empty()
        && !redis.keys("ringway:cache:u:*").is_empty()));
}

/// Waits (bounded) until `n` entries and their URLs' index sets are in Redis (see
/// [`wait_stored_in_redis`]).
fn wait_n_stored_in_redis(redis: &RedisServer, n: usize) {
    assert!(eventually(Duration::from_secs(5), || redis
        .keys("ringway:cache:o:*")
        .len()
        == n
        && redis.keys("ringway:cache:u:*").len() == n));
}

fn redis_cache_config(up: SocketAddr, redis: &RedisServer) -> String {
    cache_config(
        up,
        "",
        &format!(
            "[cache.redis]\naddress = \"127.0.0.1:{}\"\ntimeout = \"200ms\"\nretry_interval = \"100ms\"\n",
            redis.port
        ),
    )
}

#[test]
fn redis_layer_shares_objects_between_three_gateways_with_one_origin_fetch() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\nage: 50\r\n");
    let gws: Vec<TestGateway> = (0..3)
        .map(|_| TestGateway::start(&redis_cache_config(up.addr, &redis), D))
        .collect();
    assert_eq!(get(gws[0].addr, "/shared").text(), "v1");
    // Written to Redis without delaying the client: wait until it is there.
    wait_stored_in_redis(&redis);
    for gw in &gws[1..] {
        let r = get(gw.addr, "/shared");
        assert_eq!(r.text(), "v1");
        assert!(status_of(&r).contains("detail=redis"), "{r:?}");
        // The origin's Age and the time since are kept across hosts (RFC 9111 §4.2.3).
        let age: u64 = r.header("age").unwrap().parse().unwrap();
        assert!((50..70).contains(&age), "{r:?}");
        // Now in that gateway's own store.
        assert!(status_of(&get(gw.addr, "/shared")).contains("hit"));
    }
    assert_eq!(up.hits(), 1, "one origin fetch for three gateways");

    // A purge on one gateway deletes the Redis copy: a gateway that never stored it locally
    // fetches again.
    let fresh = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    ringway::cache::purge(
        gws[0].gateway().control(),
        Purge {
            target: PurgeTarget::Url(ringway::cache::purge_url("test.local", "/shared")),
            soft: false,
        },
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || redis
        .keys("ringway:cache:o:*")
        .is_empty()));
    assert_eq!(get(fresh.addr, "/shared").text(), "v2");
}

#[test]
fn redis_down_fails_open_to_the_origin() {
    let mut redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let gw = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    redis.kill();
    for i in 0..5 {
        let t0 = std::time::Instant::now();
        let r = get(gw.addr, &format!("/down{i}"));
        assert_eq!(r.status, 200);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
    // The local store still works.
    assert!(status_of(&get(gw.addr, "/down0")).contains("hit"));
    assert_eq!(up.hits(), 5);
    // Redis back: shared again.
    redis.restart();
    assert!(eventually(Duration::from_secs(10), || {
        get(gw.addr, &format!("/back{}", up.hits()));
        !redis.keys("ringway:cache:o:*").is_empty()
    }));
}

/// An origin whose first answer is `v1`, stale at once within a 60 s stale-while-revalidate
/// window (etag "a"); every later request (the revalidation) is held until the returned event
/// is set, then answered `v2`. Also returns the count of requests it got.
fn held_revalidation_origin() -> (Upstream, Arc<Event>, Arc<AtomicUsize>) {
    let release = Event::new();
    let rel = release.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=0, stale-while-revalidate=60\r\netag: \"a\"\r\ncontent-length: 2\r\n\r\nv1".to_vec());
        }
        Reply::Script(vec![
            Step::Await(rel.clone()),
            Step::Write(b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"b\"\r\ncontent-length: 2\r\n\r\nv2".to_vec()),
        ])
    });
    (up, release, n)
}

/// RFC 5861 §3 holds for an entry a gateway finds only in Redis: within its
/// `stale-while-revalidate` window it is answered at once (a stale hit, RFC 9211 §3) and
/// revalidated in the background, as a local entry is. Before, the Redis branch validated it
/// first, so the client waited for the origin (cache-tests `stale-while-revalidate-window`
/// with two workers and `[cache.redis]`).
#[test]
fn rfc5861_3_stale_while_revalidate_applies_to_an_entry_found_in_redis() {
    let redis = RedisServer::start();
    let (up, release, n) = held_revalidation_origin();
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert_eq!(get(a.addr, "/swr").text(), "v1");
    wait_stored_in_redis(&redis);
    // B has it only in Redis, stale: answered while the origin still holds the revalidation.
    let r = get(b.addr, "/swr");
    assert!(!release.is_set());
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    let st = status_of(&r);
    assert!(st.starts_with("ringway; hit; ttl="), "{r:?}");
    assert!(st.contains("detail=stale-while-revalidate"), "{r:?}");
    // The background revalidation went out with the stored validator.
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 2));
    assert_eq!(up.last().header("if-none-match"), Some("\"a\""));
    release.set();
    assert!(eventually(Duration::from_secs(5), || get(b.addr, "/swr")
        .text()
        == "v2"));
    assert_eq!(n.load(Ordering::SeqCst), 2, "one revalidation");
}

/// RFC 5861 §3 for coalesced waiters: requests that waited on a fetch which found the entry in
/// Redis, stale within its stale-while-revalidate window, are answered with it at once too,
/// not after the background revalidation that then holds the key's flight.
#[test]
fn rfc5861_3_waiters_behind_a_redis_lookup_get_the_stale_entry_at_once() {
    let redis = RedisServer::start();
    let (up, release, n) = held_revalidation_origin();
    // A Redis timeout longer than the pause below, so that the lookup waits instead of
    // failing open.
    let toml = cache_config(
        up.addr,
        "",
        &format!(
            "[cache.redis]\naddress = \"127.0.0.1:{}\"\ntimeout = \"5s\"\nretry_interval = \"100ms\"\n",
            redis.port
        ),
    );
    let a = TestGateway::start(&toml, D);
    let b = TestGateway::start(&toml, D);
    assert_eq!(get(a.addr, "/swr-wait").text(), "v1");
    wait_stored_in_redis(&redis);
    // Redis holds every command for a second: B's first request waits on its lookup, the
    // others (same worker) on that request's flight.
    assert!(redis
        .command(&["CLIENT", "PAUSE", "1000", "ALL"])
        .is_some_and(|r| r.starts_with("+OK")));
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(b.addr)).collect();
    for c in &mut clients {
        c.send(b"GET /swr-wait HTTP/1.1\r\nHost: test.local\r\n\r\n");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.read_timeout(Duration::from_secs(10));
        let r = c
            .read_response()
            .expect("an answer while the revalidation is held");
        assert!(!release.is_set());
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "v1"),
            "request {i}: {r:?}"
        );
        let st = status_of(&r);
        assert!(
            st.contains("detail=stale-while-revalidate"),
            "request {i}: {r:?}"
        );
    }
    release.set();
    // One revalidation for all of them.
    assert!(eventually(Duration::from_secs(5), || get(
        b.addr,
        "/swr-wait"
    )
    .text()
        == "v2"));
    assert_eq!(n.load(Ordering::SeqCst), 2, "one revalidation");
}

/// RFC 9111 §5.2.1.4 with the Redis layer: a `no-cache` request to a gateway that has the
/// entry only in Redis is validated with the stored validator (a 304 then answers with the
/// stored body), not fetched whole.
#[test]
fn rfc9111_5_2_1_4_no_cache_request_validates_an_entry_found_in_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start(|req| {
        if req.header("if-none-match") == Some("\"a\"") {
            return Reply::Raw(
                b"HTTP/1.1 304 Not Modified\r\ncache-control: max-age=60\r\netag: \"a\"\r\n\r\n"
                    .to_vec(),
            );
        }
        Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"a\"\r\ncontent-length: 2\r\n\r\nv1".to_vec())
    });
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert_eq!(get(a.addr, "/nc").text(), "v1");
    wait_stored_in_redis(&redis);
    let mut c = Client::connect(b.addr);
    c.send(b"GET /nc HTTP/1.1\r\nHost: test.local\r\nCache-Control: no-cache\r\n\r\n");
    let r = c.read_response().expect("answer");
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    assert_eq!(up.hits(), 2);
    assert_eq!(
        up.last().header("if-none-match"),
        Some("\"a\""),
        "validated with the validator stored in Redis"
    );
}

/// RFC 5861 §4 holds for an entry a gateway finds only in Redis: within its `stale-if-error`
/// window it answers for an origin that fails.
#[test]
fn rfc5861_4_stale_if_error_applies_to_an_entry_found_in_redis() {
    let redis = RedisServer::start();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=0, stale-if-error=60\r\ncontent-length: 2\r\n\r\nok".to_vec())
        } else {
            Reply::Raw(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown".to_vec(),
            )
        }
    });
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert_eq!(get(a.addr, "/sie").text(), "ok");
    wait_stored_in_redis(&redis);
    let r = get(b.addr, "/sie");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");
    assert!(status_of(&r).contains("detail=stale-if-error"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 2, "B asked the origin first");
}

#[test]
fn coalesced_waiters_receive_the_body_as_it_arrives() {
    use std::io::{Read, Write};
    let up = Upstream::start(|_| {
        Reply::Script(vec![
            Step::Write(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 12\r\n\r\nfirst"
                    .to_vec(),
            ),
            Step::Wait(Duration::from_millis(1500)),
            Step::Write(b"-second".to_vec()),
        ])
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let mut leader = Client::connect(gw.addr);
    leader.send(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 1));
    let t0 = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(5).any(|w| w == b"first") {
        let n = s.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{e} after {:?}: {:?}",
                t0.elapsed(),
                String::from_utf8_lossy(&got)
            )
        });
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(t0.elapsed() < Duration::from_millis(1200), "{text}");
    assert!(!text.contains("second"), "{text}");
    assert!(text.contains("collapsed"), "{text}");
    // Then the rest, and the leader's whole answer; one upstream request.
    while !got.windows(6).any(|w| w == b"second") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(leader.read_response().unwrap().text(), "first-second");
    assert_eq!(up.hits(), 1);
    assert_eq!(get(gw.addr, "/slow").text(), "first-second");
}

#[test]
fn rfc9111_4_3_4_a_304_with_another_strong_etag_updates_nothing_and_the_response_is_fetched_again()
{
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        match (i, req.header("if-none-match")) {
            (0, _) => Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"a\"\r\ncontent-length: 3\r\n\r\nold".to_vec()),
            (_, Some(_)) => Reply::Raw(b"HTTP/1.1 304 Not Modified\r\netag: \"b\"\r\ncache-control: max-age=60\r\n\r\n".to_vec()),
            (_, None) => Reply::Raw(b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"b\"\r\ncontent-length: 3\r\n\r\nnew".to_vec()),
        }
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/s").text(), "old");
    let r = get(gw.addr, "/s");
    assert_eq!((r.status, r.text().as_str()), (200, "new"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 3);
    assert_eq!(get(gw.addr, "/s").text(), "new");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

/// RFC 9111 §4.3.4: a 304 with a validator the stored response does not have (an entity tag
/// where none is stored, another Last-Modified) selects nothing: the stored response is not
/// relabelled with validators it does not have, but fetched again whole.
#[test]
fn rfc9111_4_3_4_a_304_with_a_validator_the_stored_response_lacks_updates_nothing() {
    let old_lm = "Sun, 06 Nov 1994 08:49:37 GMT";
    for (stored, answer_304) in [
        // Stored without an entity tag; the 304 brings one.
        (
            format!("last-modified: {old_lm}\r\n"),
            "etag: \"e2\"\r\n".to_string(),
        ),
        // Stored with a Last-Modified; the 304 brings another.
        (
            format!("last-modified: {old_lm}\r\n"),
            "last-modified: Mon, 07 Nov 1994 08:49:37 GMT\r\n".to_string(),
        ),
    ] {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let up = Upstream::start(move |req| {
            let i = n2.fetch_add(1, Ordering::SeqCst);
            match (i, req.header("if-modified-since")) {
                (0, _) => Reply::Raw(
                    format!("HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\n{stored}content-length: 3\r\n\r\nold")
                        .into_bytes(),
                ),
                (_, Some(_)) => Reply::Raw(
                    format!("HTTP/1.1 304 Not Modified\r\ncache-control: max-age=60\r\n{answer_304}\r\n")
                        .into_bytes(),
                ),
                (_, None) => Reply::Raw(
                    b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 3\r\n\r\nnew"
                        .to_vec(),
                ),
            }
        });
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        assert_eq!(get(gw.addr, "/s").text(), "old");
        let r = get(gw.addr, "/s");
        assert_eq!((r.status, r.text().as_str()), (200, "new"), "{r:?}");
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }
    // The same Last-Modified (written otherwise, as a date it is the same) selects it.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        match (i, req.header("if-modified-since")) {
            (0, _) => Reply::Raw(
                format!("HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\nlast-modified: {old_lm}\r\ncontent-length: 3\r\n\r\nold")
                    .into_bytes(),
            ),
            _ => Reply::Raw(
                format!("HTTP/1.1 304 Not Modified\r\ncache-control: max-age=60\r\nlast-modified: {old_lm}\r\n\r\n")
                    .into_bytes(),
            ),
        }
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/s").text(), "old");
    let r = get(gw.addr, "/s");
    assert_eq!((r.status, r.text().as_str()), (200, "old"), "{r:?}");
    assert!(status_of(&r).contains("fwd-status=304"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// RFC 9111 §4.4: a response to a request sent before an invalidation (a POST to the URL) or
/// a purge of it is content from before it: it answers its own client but is not stored,
/// else the old content would stay for its whole lifetime after the write.
#[test]
fn rfc9111_4_4_a_fetch_in_flight_when_its_url_is_invalidated_is_not_stored() {
    for purge in [false, true] {
        let release = Event::new();
        let rel = release.clone();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let up = Upstream::start(move |req| {
            if req.method != "GET" {
                return Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec());
            }
            let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 2\r\n\r\nv{i}"
            )
            .into_bytes();
            if i == 1 {
                Reply::Script(vec![Step::Await(rel.clone()), Step::Write(answer)])
            } else {
                Reply::Raw(answer)
            }
        });
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        let addr = gw.addr;
        let first = std::thread::spawn(move || get(addr, "/w"));
        assert!(up.wait_for(Duration::from_secs(10), |r| r.len() == 1));
        if purge {
            // Through the control plane (the admin API's purge).
            let control = gw.gateway().control();
            let target = PurgeTarget::Url(ringway::cache::purge_url("test.local", "/w"));
            let p = Purge {
                target,
                soft: false,
            };
            ringway::cache::purge(control, p, Duration::from_secs(2)).unwrap();
        } else {
            let w = request(
                gw.addr,
                b"POST /w HTTP/1.1\r\nHost: test.local\r\ncontent-length: 1\r\n\r\nx",
            );
            assert_eq!(w.status, 200, "{w:?}");
        }
        release.set();
        let a = first.join().unwrap();
        assert_eq!(a.text(), "v1", "{a:?}");
        assert!(!status_of(&a).contains("stored"), "{a:?}");
        let b = get(gw.addr, "/w");
        assert_eq!(b.text(), "v2", "purge {purge}: {b:?}");
        assert_eq!(get(gw.addr, "/w").text(), "v2");
    }
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Three gateway processes (two workers each) on one Redis: the origin sees one fetch for the
/// fleet, however the requests spread over hosts and workers afterwards.
#[test]
fn redis_layer_three_gateway_processes_one_origin_fetch() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let dir = std::env::temp_dir().join(format!("ringway-cache-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let _procs: Vec<Proc> = addrs
        .iter()
        .map(|a| {
            let toml = redis_cache_config(up.addr, &redis)
                .replace("address = \"127.0.0.1:0\"", &format!("address = \"{a}\""));
            let file = dir.join(format!("gw-{}.toml", a.port()));
            std::fs::write(&file, toml).unwrap();
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_ringway"))
                .args(["run", "--workers", "2", "-c"])
                .arg(&file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn ringway");
            let p = Proc(child);
            assert!(eventually(Duration::from_secs(10), || {
                std::net::TcpStream::connect(a).is_ok()
            }));
            p
        })
        .collect();
    assert_eq!(get(addrs[0], "/fleet").text(), "v1");
    wait_stored_in_redis(&redis);
    let handles: Vec<_> = addrs
        .iter()
        .map(|a| {
            let a = *a;
            std::thread::spawn(move || (0..30).map(|_| get(a, "/fleet").text()).collect::<Vec<_>>())
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().iter().all(|t| t == "v1"));
    }
    println!("3 processes, 91 requests: {} origin fetch(es)", up.hits());
    assert_eq!(up.hits(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rfc9111_4_3_5_a_head_answer_freshens_or_invalidates_the_stored_get() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let etag = Arc::new(std::sync::Mutex::new("\"a\""));
    let e2 = etag.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let e = *e2.lock().unwrap();
        let cc = if req.method == "HEAD" {
            "max-age=60"
        } else {
            "max-age=0"
        };
        let body = format!("v{i}");
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: {cc}\r\netag: {e}\r\ncontent-length: {}\r\n\r\n{}",
                body.len(),
                if req.method == "HEAD" { "" } else { &body }
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let head = |gw: &TestGateway| request(gw.addr, b"HEAD /h HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert_eq!(get(gw.addr, "/h").text(), "v1");
    // Same validator: the stored GET takes the HEAD's freshness.
    assert_eq!(head(&gw).status, 200);
    let r = get(gw.addr, "/h");
    assert_eq!(r.text(), "v1");
    assert!(status_of(&r).contains("hit"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 2);

    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/h").text(), "v3");
    *etag.lock().unwrap() = "\"b\"";
    head(&gw);
    // Another validator: the stored GET is gone, fetched again.
    assert_eq!(get(gw.addr, "/h").text(), "v5");
}

/// RFC 9111 §5.2.1.5: a request with `no-store` has no part of any response to it stored.
/// A HEAD that goes upstream freshens the stored GET with its answer's fields (§4.3.5), and
/// did so for a HEAD with `Cache-Control: no-store` too (the 304 of a GET's validation
/// already did not). Found by `tests/fuzz_cache_redis.rs` (the stored GET taken from Redis):
/// `GET /h` stored `HTTP/1.1 200 OK`, `cache-control: max-age=0`, `etag: "a"`; then `HEAD /h`
/// with `Cache-Control: no-store` got `200`, `cache-control: max-age=60`, `etag: "a"`,
/// `x-head: 1`, and the next `GET /h` was a hit with `x-head: 1`, fresh for a minute. The
/// HEAD may still invalidate the stored GET (that stores nothing).
#[test]
fn rfc9111_5_2_1_5_a_head_with_no_store_does_not_freshen_the_stored_get() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let etag = Arc::new(std::sync::Mutex::new("\"a\""));
    let e2 = etag.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let e = *e2.lock().unwrap();
        let body = format!("v{i}");
        let (cc, extra, payload) = if req.method == "HEAD" {
            ("max-age=60", "x-head: 1\r\n", "")
        } else {
            ("max-age=0", "", body.as_str())
        };
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: {cc}\r\netag: {e}\r\n{extra}content-length: {}\r\n\r\n{payload}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let head_no_store = |gw: &TestGateway| {
        request(
            gw.addr,
            b"HEAD /h HTTP/1.1\r\nHost: test.local\r\nCache-Control: no-store\r\n\r\n",
        )
    };
    for d in DRIVERS {
        n.store(0, Ordering::SeqCst);
        *etag.lock().unwrap() = "\"a\"";
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        assert_eq!(get(gw.addr, "/h").text(), "v1");
        let h = head_no_store(&gw);
        assert_eq!((h.status, h.header("x-head")), (200, Some("1")), "{h:?}");
        // The stored GET is as it was: stale, validated (upstream) by the next GET.
        let r = get(gw.addr, "/h");
        assert!(
            !r.has("x-head"),
            "{d:?}: the HEAD's fields were stored: {r:?}"
        );
        assert!(!status_of(&r).contains("hit"), "{d:?}: {r:?}");
        assert_eq!(n.load(Ordering::SeqCst), 3, "{d:?}");
        // Validators that disagree still invalidate it (nothing stored).
        *etag.lock().unwrap() = "\"b\"";
        head_no_store(&gw);
        assert_eq!(get(gw.addr, "/h").text(), "v5", "{d:?}");
    }
}

#[test]
fn a_response_varying_on_too_many_fields_is_not_stored() {
    let names: Vec<String> = (0..17).map(|i| format!("x-v{i}")).collect();
    let head: &'static str = Box::leak(
        format!(
            "cache-control: max-age=60\r\nvary: {}\r\n",
            names.join(", ")
        )
        .into_boxed_str(),
    );
    let (up, _) = counting_origin(head);
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let r = get(gw.addr, "/vv");
    assert!(status_of(&r).contains("detail=vary-too-many"), "{r:?}");
    assert_eq!(get(gw.addr, "/vv").text(), "v2");
}

/// How many clients wait on Redis for the purge log to grow (each gateway's listener, between
/// its reads of the log).
fn log_followers(redis: &RedisServer) -> usize {
    redis
        .command(&["CLIENT", "LIST"])
        .unwrap_or_default()
        .matches("cmd=xread")
        .count()
}

#[test]
fn redis_purge_reaches_the_local_stores_of_every_host() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    // Both hosts follow the purge log.
    assert!(eventually(Duration::from_secs(5), || log_followers(&redis) == 2));
    assert_eq!(get(a.addr, "/p").text(), "v1");
    wait_stored_in_redis(&redis);
    // B takes it from Redis into its own store.
    assert!(status_of(&get(b.addr, "/p")).contains("detail=redis"));
    assert!(status_of(&get(b.addr, "/p")).starts_with("ringway; hit"));
    let entries = |gw: &TestGateway| {
        ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2))
            .unwrap()
            .iter()
            .map(|s| s.entries)
            .sum::<u64>()
    };
    assert_eq!(entries(&b), 1);
    // A purge made on A (the admin API's function) empties B's local store too.
    hard_purge(
        &a,
        PurgeTarget::Url(ringway::cache::purge_url("test.local", "/p")),
    );
    // B's copy is gone for its lookups once the purge arrives (it leaves B's store at the
    // lookup that meets it: a purge by URL reads no other object), and B fetches anew.
    assert!(eventually(Duration::from_secs(5), || get(b.addr, "/p")
        .text()
        == "v2"));
    let purged = ringway::cache::stats(b.gateway().control(), Duration::from_secs(2))
        .unwrap()
        .iter()
        .map(|s| (s.purged, s.purge_scanned))
        .fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1));
    assert_eq!(purged, (1, 0));
    assert_eq!(entries(&b), 1);
}

/// A purge by prefix and a purge of everything reach Redis too (RFC 9111 §4.4 has a cache
/// remove what it invalidates; a purge is the operator's invalidation): before, only purges
/// by URL and by tag deleted the Redis copies, so the very next local miss, on the host that
/// purged or any other, found the purged object in Redis and served it again. Keys of the
/// prefix that the layer does not write (a rate limiter's, say) are left alone.
#[test]
fn redis_purge_by_prefix_and_of_everything_deletes_the_redis_copies() {
    let redis = RedisServer::start();
    let (up, n) = counting_origin("cache-control: max-age=600\r\n");
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    for p in ["/docs/1", "/docs/2", "/x"] {
        get(a.addr, p);
    }
    assert_eq!(n.load(Ordering::SeqCst), 3);
    let entries = || redis.keys("ringway:cache:o:*").len();
    assert!(eventually(Duration::from_secs(5), || entries() == 3));
    assert!(redis
        .command(&["SET", "ringway:cache:rl:other", "1"])
        .is_some_and(|r| r.starts_with("+OK")));
    let purge = |target| {
        ringway::cache::purge(
            a.gateway().control(),
            Purge {
                target,
                soft: false,
            },
            Duration::from_secs(2),
        )
        .unwrap()
    };
    purge(PurgeTarget::Prefix(b"test.local/docs/".to_vec()));
    assert!(
        eventually(Duration::from_secs(5), || entries() == 1),
        "{:?}",
        redis.keys("ringway:cache:*")
    );
    // A gateway that never stored anything takes /x from Redis, and fetches /docs/1.
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert!(status_of(&get(b.addr, "/x")).contains("detail=redis"));
    assert_eq!(get(b.addr, "/docs/1").text(), "v4");
    wait_stored_in_redis(&redis);
    purge(PurgeTarget::All);
    // The purge log stays: the other hosts read the purge of everything there.
    assert!(
        eventually(Duration::from_secs(5), || redis
            .keys("ringway:cache:*")
            .iter()
            .all(
                |k| k == "ringway:cache:rl:other" || k == "ringway:cache:purge-log"
            )),
        "{:?}",
        redis.keys("ringway:cache:*")
    );
    assert_eq!(redis.keys("ringway:cache:rl:other").len(), 1);
    assert_eq!(get(a.addr, "/x").text(), "v5");
}

/// A relay in front of Redis that can be cut (its connections closed, new ones closed as
/// they come) and mended, Redis keeping its data meanwhile.
struct RedisRelay {
    addr: SocketAddr,
    /// Whether it relays, and the sockets of the connections it relays (closed by a cut).
    state: Arc<std::sync::Mutex<(bool, Vec<std::net::TcpStream>)>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RedisRelay {
    fn start(to: SocketAddr) -> RedisRelay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(std::sync::Mutex::new((true, Vec::new())));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(c) = c else { continue };
                let mut g = st.lock().unwrap();
                if !g.0 {
                    continue;
                }
                let Ok(r) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                for s in [&c, &r] {
                    g.1.push(s.try_clone().unwrap());
                }
                drop(g);
                for (mut from, mut into) in
                    [(c.try_clone().unwrap(), r.try_clone().unwrap()), (r, c)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        RedisRelay { addr, state, stop }
    }

    fn cut(&self) {
        let mut g = self.state.lock().unwrap();
        g.0 = false;
        for s in g.1.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn mend(&self) {
        self.state.lock().unwrap().0 = true;
    }
}

impl Drop for RedisRelay {
    fn drop(&mut self) {
        self.cut();
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// A gateway with a cache whose Redis layer goes through `relay` (short timeouts, so that a
/// cut link is found down and a mended one up within a test).
fn gateway_through(relay: &RedisRelay, upstream: SocketAddr) -> TestGateway {
    TestGateway::start(
        &cache_config(
            upstream,
            "",
            &format!(
                "[cache.redis]\naddress = \"{}\"\ntimeout = \"200ms\"\nretry_interval = \"100ms\"\n",
                relay.addr
            ),
        ),
        D,
    )
}

/// `f` of worker 0's Redis layer in `gw` (0 without one).
fn layer_count(gw: &TestGateway, f: fn(&ringway::cache::redis::SharedLayer) -> u64) -> u64 {
    gw.gateway()
        .control()
        .ask(Duration::from_secs(2), move |w| {
            w.cache.shared().map_or(0, |l| f(l))
        })
        .unwrap()[0]
}

/// Mends `relay` and waits until `gw`'s Redis link (worker 0's) is up again.
fn mend_and_wait_up(relay: &RedisRelay, gw: &TestGateway) {
    relay.mend();
    assert!(eventually(Duration::from_secs(10), || layer_count(
        gw,
        |l| u64::from(!l.link().is_down())
    ) == 1));
}

/// A hard purge of `target` through `gw`'s admin path (every worker, then Redis).
fn hard_purge(gw: &TestGateway, target: PurgeTarget) {
    ringway::cache::purge(
        gw.gateway().control(),
        Purge {
            target,
            soft: false,
        },
        Duration::from_secs(2),
    )
    .unwrap();
}

/// Cuts `relay` (`a`'s way to Redis) and hard-purges `/p` through `a`: the purge's Redis side
/// fails, and `a` keeps it to send again (waited for).
fn cut_and_purge_p(relay: &RedisRelay, a: &TestGateway) {
    relay.cut();
    hard_purge(
        a,
        PurgeTarget::Url(ringway::cache::purge_url("test.local", "/p")),
    );
    assert!(eventually(Duration::from_secs(5), || layer_count(
        a,
        |l| l.unsent_purges() as u64
    ) == 1));
}

/// Invalidates each of `paths` through `gw` (RFC 9111 §4.4: a POST answered 200).
fn invalidate_all(gw: &TestGateway, paths: impl IntoIterator<Item = String>) {
    for path in paths {
        let r = request(
            gw.addr,
            format!("POST {path} HTTP/1.1\r\nHost: test.local\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(r.status, 200, "{path}");
    }
}

/// RFC 9111 §4.4 (a purge is the operator's invalidation: what it removed must not be
/// served again): a purge made while the link to Redis is down could not delete the Redis
/// copies nor reach the other hosts, and was taken as done at once; once the link was up, a
/// lookup brought the purged copy back from Redis, and the other hosts kept serving theirs.
/// Now it is kept and sent again once the link is up (the copies deleted, the other hosts
/// told), and until then no worker takes from Redis an entry it covers received before it.
#[test]
fn rfc9111_4_4_a_purge_made_while_redis_is_unreachable_is_sent_again_once_it_is_back() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr());
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = gateway_through(&relay, up.addr);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert!(eventually(Duration::from_secs(5), || log_followers(&redis) == 2));
    for p in ["/p", "/t/1"] {
        assert_eq!(get(a.addr, p).text(), if p == "/p" { "v1" } else { "v2" });
    }
    wait_n_stored_in_redis(&redis, 2);
    // B holds /p too, taken from Redis.
    assert!(status_of(&get(b.addr, "/p")).contains("detail=redis"));
    assert!(status_of(&get(b.addr, "/p")).starts_with("ringway; hit"));

    relay.cut();
    for target in [
        PurgeTarget::Url(ringway::cache::purge_url("test.local", "/p")),
        PurgeTarget::Prefix(b"test.local/t/".to_vec()),
    ] {
        hard_purge(&a, target);
    }
    // A could not reach Redis: the copies are still there.
    assert_eq!(redis.keys("ringway:cache:o:*").len(), 2);
    // Kept to be sent again (counted), and awaited on A's workers.
    let layer = |f: fn(&ringway::cache::redis::SharedLayer) -> u64| layer_count(&a, f);
    assert!(eventually(Duration::from_secs(5), || layer(
        |l| l.unsent_purges() as u64
    ) == 2));
    assert!(layer(|l| l.purges_failed.load(Ordering::Relaxed)) >= 2);
    mend_and_wait_up(&relay, &a);
    // Once A's link is up again, its lookup does not bring /p back from Redis (the purge's
    // deletions may be on their way, or done).
    let r = get(a.addr, "/p");
    assert_ne!(r.text(), "v1", "{r:?}");
    // The purges go again: the copies leave Redis (A's new /p aside), and B hears them and
    // fetches anew.
    assert!(
        eventually(Duration::from_secs(10), || redis
            .keys("ringway:cache:o:*/t/1")
            .is_empty()),
        "{:?}",
        redis.keys("ringway:cache:*")
    );
    assert!(eventually(Duration::from_secs(5), || get(b.addr, "/p")
        .text()
        != "v1"));
    // A's lookups find nothing to bring back; nothing is left to send.
    assert_ne!(get(a.addr, "/p").text(), "v1");
    assert_ne!(get(a.addr, "/t/1").text(), "v2");
    assert_eq!(layer(|l| l.unsent_purges() as u64), 0);
}

/// RFC 9111 §4.4 while Redis cannot be reached: a purge is kept to be sent again, and so is
/// every invalidation by an unsafe method. Before, each one of them took a place of the 64
/// a host keeps (and of the 64 each worker awaits), so that 64 `POST`s to one URL gave up an
/// earlier purge of another: once the link was up, a lookup brought the purged copy back
/// from Redis. Now a purge equal to one already kept or awaited replaces it.
#[test]
fn rfc9111_4_4_repeated_invalidations_while_redis_is_unreachable_do_not_give_up_a_purge() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr());
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = gateway_through(&relay, up.addr);
    assert_eq!(get(a.addr, "/p").text(), "v1");
    wait_n_stored_in_redis(&redis, 1);
    cut_and_purge_p(&relay, &a);
    let layer = |f: fn(&ringway::cache::redis::SharedLayer) -> u64| layer_count(&a, f);
    // 70 POSTs to one URL, each an invalidation whose Redis side fails.
    invalidate_all(&a, (0..70).map(|_| "/q".to_string()));
    assert!(eventually(Duration::from_secs(5), || layer(|l| l
        .purges_failed
        .load(Ordering::Relaxed))
        >= 71));
    assert_eq!(layer(|l| l.purges_given_up.load(Ordering::Relaxed)), 0);
    assert_eq!(layer(|l| l.unsent_purges() as u64), 2);
    mend_and_wait_up(&relay, &a);
    // The purge of /p was kept, and awaited: its copy does not come back from Redis.
    let r = get(a.addr, "/p");
    assert_ne!(r.text(), "v1", "{r:?}");
    assert!(eventually(Duration::from_secs(10), || layer(
        |l| l.unsent_purges() as u64
    ) == 0));
    assert_ne!(get(a.addr, "/p").text(), "v1");
}

/// RFC 9111 §4.4, issue 12: a purge whose Redis side failed while the link stayed up
/// (Redis answered its deletion with an error: here `NOREPLICAS`, as a primary that lost its
/// replicas answers; `READONLY` from a replica after a failover is the same) is tried again
/// on its own, on a timer with backoff, each failed try counted. Before, it was kept but sent
/// again only with the next purge or once the link went down and up: with neither, its copy
/// stayed in Redis for good and every host's lookup could bring it back.
#[test]
fn rfc9111_4_4_a_purge_redis_answered_with_an_error_is_tried_again_on_its_own() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert_eq!(get(a.addr, "/p").text(), "v1");
    wait_stored_in_redis(&redis);
    let set = |v: &str| {
        assert!(redis
            .command(&["CONFIG", "SET", "min-replicas-to-write", v])
            .is_some_and(|r| r.starts_with("+OK")));
    };
    // Every write refused with an error; reads and `PING` answered: the link stays up.
    set("1");
    hard_purge(
        &a,
        PurgeTarget::Url(ringway::cache::purge_url("test.local", "/p")),
    );
    let layer = |f: fn(&ringway::cache::redis::SharedLayer) -> u64| layer_count(&a, f);
    // Tried again with no other purge and the link never down: each try fails, counted.
    assert!(eventually(Duration::from_secs(10), || layer(|l| l
        .purges_failed
        .load(Ordering::Relaxed))
        >= 2));
    assert_eq!(layer(|l| u64::from(l.link().is_down())), 0);
    assert_eq!(layer(|l| l.unsent_purges() as u64), 1);
    assert_eq!(redis.keys("ringway:cache:o:*").len(), 1);
    // Redis takes writes again: the next try deletes the copy, nothing is left to send.
    set("0");
    assert!(
        eventually(Duration::from_secs(15), || redis
            .keys("ringway:cache:o:*")
            .is_empty()),
        "{:?}",
        redis.keys("ringway:cache:*")
    );
    assert!(eventually(Duration::from_secs(5), || layer(
        |l| l.unsent_purges() as u64
    ) == 0));
    assert_eq!(layer(|l| l.purges_given_up.load(Ordering::Relaxed)), 0);
    assert_eq!(get(a.addr, "/p").text(), "v2");
}

/// RFC 9111 §4.4, issue 12: while Redis answers purges with errors and the link stays up, the
/// purges kept are tried again on their timer, with backoff, not with every new purge. Before,
/// each new purge (an invalidation at every unsafe request) first sent every kept purge
/// again: 20 invalidations made some 210 failing purges against the failing Redis. Once Redis
/// takes writes again, a purge that goes through has the kept ones sent.
#[test]
fn rfc9111_4_4_purges_kept_on_redis_errors_are_not_sent_again_with_every_new_purge() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let set = |v: &str| {
        assert!(redis
            .command(&["CONFIG", "SET", "min-replicas-to-write", v])
            .is_some_and(|r| r.starts_with("+OK")));
    };
    let layer = |f: fn(&ringway::cache::redis::SharedLayer) -> u64| layer_count(&a, f);
    // Every write refused with an error (`NOREPLICAS`); the link stays up.
    set("1");
    for i in 0..20 {
        let r = request(
            a.addr,
            format!("POST /x{i} HTTP/1.1\r\nHost: test.local\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(r.status, 200);
    }
    assert!(eventually(Duration::from_secs(10), || layer(
        |l| l.unsent_purges() as u64
    ) == 20));
    assert_eq!(layer(|l| u64::from(l.link().is_down())), 0);
    // One failure each, and a few more for the timer's tries (1 s, then 2 s, 4 s...).
    let failed = layer(|l| l.purges_failed.load(Ordering::Relaxed));
    assert!(failed < 100, "{failed} failed tries for 20 purges");
    set("0");
    let r = request(
        a.addr,
        b"POST /y HTTP/1.1\r\nHost: test.local\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(eventually(Duration::from_secs(15), || layer(
        |l| l.unsent_purges() as u64
    ) == 0));
    assert_eq!(layer(|l| l.purges_given_up.load(Ordering::Relaxed)), 0);
}

/// Every stored response's count of `gw`'s workers.
fn stored_entries(gw: &TestGateway) -> u64 {
    ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2))
        .unwrap()
        .iter()
        .map(|s| s.entries)
        .sum()
}

/// RFC 9111 §4.4, issue 12: a host whose connection to Redis is down while another host
/// purges applies the purge once it is back, from the purge log in Redis. Before, purges
/// were only published on a channel: a host not subscribed at that moment missed it for
/// good, and kept serving its copy until it expired.
#[test]
fn rfc9111_4_4_a_host_cut_off_from_redis_during_a_purge_applies_it_once_back() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr());
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = gateway_through(&relay, up.addr);
    assert_eq!(get(a.addr, "/p").text(), "v1");
    wait_stored_in_redis(&redis);
    // B holds /p, taken from Redis.
    assert!(status_of(&get(b.addr, "/p")).contains("detail=redis"));
    assert!(status_of(&get(b.addr, "/p")).starts_with("ringway; hit"));
    relay.cut();
    hard_purge(
        &a,
        PurgeTarget::Url(ringway::cache::purge_url("test.local", "/p")),
    );
    // The Redis copy is gone (A reaches Redis); B, cut off, still has its own.
    assert!(eventually(Duration::from_secs(5), || redis
        .keys("ringway:cache:o:*")
        .is_empty()));
    assert_eq!(get(b.addr, "/p").text(), "v1");
    mend_and_wait_up(&relay, &b);
    // B reads the purge from the log once its listener is back, and fetches anew.
    assert!(eventually(Duration::from_secs(10), || get(b.addr, "/p")
        .text()
        != "v1"));
}

/// A relay in front of Redis whose bytes can be held (read, not passed on) and let go, the
/// connections kept: a host's commands then reach Redis late, in their order.
struct HoldingRelay {
    addr: SocketAddr,
    held: Arc<std::sync::atomic::AtomicBool>,
    /// The local addresses of its connections to Redis (as `CLIENT LIST` names them).
    conns: Arc<std::sync::Mutex<Vec<String>>>,
}

impl HoldingRelay {
    fn start(to: SocketAddr) -> HoldingRelay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, cs) = (held.clone(), conns.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let Ok(r) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                cs.lock().unwrap().push(r.local_addr().unwrap().to_string());
                for (mut from, mut into) in
                    [(c.try_clone().unwrap(), r.try_clone().unwrap()), (r, c)]
                {
                    let h = h.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            while h.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            if into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        HoldingRelay { addr, held, conns }
    }
}

/// RFC 9111 §4.4 and the README's purge guarantee (a purge deletes the Redis copies and
/// reaches every host): another host's write of a copy received before the purge, still
/// queued on its link as the purge deleted the Redis copies, reached Redis after that
/// deletion, and every host then took the purged copy back from Redis until it expired.
/// Found by `tests/fuzz_cache_redis.rs` (host B stored a chunked `200` with
/// `max-age=3600`, the client had it whole, a hard purge of the URL through host A's admin
/// API, and host B's next GET was `hit; detail=redis` with the copy from before the purge).
/// Here B's commands are held in a relay while A purges: before, A's next `GET /p` was
/// `200`, `cache-status: ringway; hit; ttl=600; detail=redis`, body `v1`. Now each host
/// that hears a purge by URL or tag deletes the copies again once its workers applied it
/// (after their own earlier writes, on its link).
#[test]
fn rfc9111_4_4_a_write_of_another_host_in_flight_at_a_purge_does_not_outlive_it_in_redis() {
    let redis = RedisServer::start();
    let relay = HoldingRelay::start(redis.addr());
    let (a, b, _up) = hosts_with_a_write_of_b_held(&redis, &relay);
    hard_purge(
        &a,
        PurgeTarget::Url(ringway::cache::purge_url("test.local", "/p")),
    );
    relay.held.store(false, Ordering::SeqCst);
    // B's write lands after the purge's deletion; B hears the purge and deletes the copies
    // again, after its write, and last a PING on the same link (waited for: unbounded
    // before, when nothing did).
    let pinged = || {
        let list = redis.command(&["CLIENT", "LIST"]).unwrap_or_default();
        let conns = relay.conns.lock().unwrap().clone();
        list.lines().any(|l| {
            l.contains("cmd=ping") && conns.iter().any(|c| l.contains(&format!("addr={c} ")))
        })
    };
    eventually(Duration::from_secs(5), pinged);
    let r = get(a.addr, "/p");
    assert_eq!(r.text(), "v2", "the copy from before the purge: {r:?}");
    assert_ne!(get(b.addr, "/p").text(), "v1");
}

/// A counting origin (see [`counting_origin`]) whose first answer waits: `arrived` hears when
/// its request came, and the answer goes once `go` is sent (or after 10 s).
struct GatedOrigin {
    up: Upstream,
    arrived: std::sync::mpsc::Receiver<()>,
    go: std::sync::mpsc::Sender<()>,
}

fn gated_counting_origin(head_fields: &'static str) -> GatedOrigin {
    let n = AtomicUsize::new(0);
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new((arrived_tx, go_rx));
    let up = Upstream::start(move |_req| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        if i == 1 {
            let g = gate.lock().unwrap();
            let _ = g.0.send(());
            let _ = g.1.recv_timeout(Duration::from_secs(10));
        }
        let body = format!("v{i}");
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{head_fields}\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    GatedOrigin { up, arrived, go }
}

/// Hosts A and B (B through `relay`) in front of one origin (`cache-control: max-age=600`);
/// B has fetched and stored `/p` (`v1`), and its write to Redis is held in the relay (held
/// until the caller lets it go). The relay holds B's bytes only from the moment the origin
/// has B's request (B's lookup in Redis answered): a hold as long as B's `timeout` had B's
/// link fail the round and drop its queued write.
fn hosts_with_a_write_of_b_held(
    redis: &RedisServer,
    relay: &HoldingRelay,
) -> (TestGateway, TestGateway, Upstream) {
    let origin = gated_counting_origin("cache-control: max-age=600\r\n");
    let up = origin.up.addr;
    let a = TestGateway::start(&redis_cache_config(up, redis), D);
    let b = TestGateway::start(
        &cache_config(
            up,
            "",
            &format!(
                "[cache.redis]\naddress = \"{}\"\ntimeout = \"10s\"\nretry_interval = \"100ms\"\n",
                relay.addr
            ),
        ),
        D,
    );
    assert!(eventually(Duration::from_secs(5), || log_followers(redis) == 2));
    // B fetches and stores /p; its write to Redis waits in the relay.
    let b_addr = b.addr;
    let fetch = std::thread::spawn(move || get(b_addr, "/p").text());
    origin
        .arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("B's fetch");
    relay.held.store(true, Ordering::SeqCst);
    origin.go.send(()).unwrap();
    assert_eq!(fetch.join().unwrap(), "v1");
    (a, b, origin.up)
}

/// [`hosts_with_a_write_of_b_held`], then host A purges `target` (`soft`: marks stale)
/// through its workers, and the relay lets B's bytes go, so that B's write lands in Redis
/// after the purge deleted the copies. Returns once B's write is in Redis and both hosts
/// heard the purge.
fn a_write_of_b_lands_after_a_purge_by_a(
    redis: &RedisServer,
    relay: &HoldingRelay,
    target: PurgeTarget,
    soft: bool,
) -> (TestGateway, TestGateway, Upstream) {
    let (a, b, up) = hosts_with_a_write_of_b_held(redis, relay);
    ringway::cache::purge(
        a.gateway().control(),
        Purge { target, soft },
        Duration::from_secs(2),
    )
    .unwrap();
    relay.held.store(false, Ordering::SeqCst);
    // B's write lands after the purge's deletion; both hosts hear the purge.
    wait_stored_in_redis(redis);
    let heard = |gw: &TestGateway| layer_count(gw, |l| l.purges_heard.load(Ordering::Relaxed));
    assert!(eventually(Duration::from_secs(10), || heard(&a) >= 1 && heard(&b) >= 1));
    (a, b, up)
}

/// RFC 9111 §4.4 and the README's purge guarantee, for a purge by prefix: its copies in Redis
/// are not deleted again by the hosts that hear it (a `SCAN` each), so B's write of a copy
/// from before it, queued on B's link as A's purge deleted the copies, landed after that
/// deletion and every host took the purged copy back from Redis until it expired (found by
/// `tests/fuzz_cache_redis.rs` with `RINGWAY_FUZZ_STRICT_PURGE=1`). Before, A's next
/// `GET /p` was `200`, `cache-status: ringway; hit; ttl=600; detail=redis`, body `v1`. Now
/// the entry carries the place in the purge log B had reached, before the purge: every host
/// that applied the purge refuses it.
#[test]
fn rfc9111_4_4_a_write_of_another_host_in_flight_at_a_purge_by_prefix_does_not_outlive_it() {
    let redis = RedisServer::start();
    let relay = HoldingRelay::start(redis.addr());
    let target = PurgeTarget::Prefix(b"test.local/".to_vec());
    let (a, b, _up) = a_write_of_b_lands_after_a_purge_by_a(&redis, &relay, target, false);
    let r = get(a.addr, "/p");
    assert_eq!(r.text(), "v2", "the copy from before the purge: {r:?}");
    assert_ne!(get(b.addr, "/p").text(), "v1");
}

/// As above, for a purge of everything (`all=1`). Before, A's next `GET /p` was the copy
/// from before the purge, from Redis.
#[test]
fn rfc9111_4_4_a_write_of_another_host_in_flight_at_a_purge_of_everything_does_not_outlive_it() {
    let redis = RedisServer::start();
    let relay = HoldingRelay::start(redis.addr());
    let (a, b, _up) =
        a_write_of_b_lands_after_a_purge_by_a(&redis, &relay, PurgeTarget::All, false);
    let r = get(a.addr, "/p");
    assert_eq!(r.text(), "v2", "the copy from before the purge: {r:?}");
    assert_ne!(get(b.addr, "/p").text(), "v1");
}

/// As above, for a soft purge by prefix: the copy from before it that B's late write put
/// back in Redis is taken stale, never fresh (RFC 9111 §4.2.4: validated before use, here a
/// new `200` from the origin). Before, A's next `GET /p` was a fresh hit from Redis, `v1`.
#[test]
fn rfc9111_4_4_a_write_of_another_host_in_flight_at_a_soft_purge_by_prefix_comes_back_stale() {
    let redis = RedisServer::start();
    let relay = HoldingRelay::start(redis.addr());
    let target = PurgeTarget::Prefix(b"test.local/".to_vec());
    let (a, _b, _up) = a_write_of_b_lands_after_a_purge_by_a(&redis, &relay, target, true);
    let r = get(a.addr, "/p");
    assert_eq!(
        r.text(),
        "v2",
        "the copy from before the purge, fresh: {r:?}"
    );
}

/// Issue 12: a host that missed more purges than the purge log keeps (1000) cannot know
/// which: it takes the safe side, purging everything it stores, once, and follows the log
/// again. The trimmed entries are the ones it had not read.
#[test]
fn a_host_that_missed_purges_the_log_no_longer_holds_purges_everything_it_stores() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr());
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = gateway_through(&relay, up.addr);
    for p in ["/p", "/q"] {
        get(b.addr, p);
    }
    assert_eq!(stored_entries(&b), 2);
    assert!(eventually(Duration::from_secs(5), || log_followers(&redis) == 2));
    relay.cut();
    // 1001 purges of other URLs (invalidations by POST, RFC 9111 §4.4): the log keeps the
    // last 1000.
    invalidate_all(&a, (0..1001).map(|i| format!("/x{i}")));
    assert!(eventually(Duration::from_secs(20), || redis
        .command(&["XLEN", "ringway:cache:purge-log"])
        .is_some_and(|r| r == ":1000\r\n")
        && !redis.keys("ringway:cache:purge-log-trimmed").is_empty()));
    assert_eq!(stored_entries(&b), 2);
    let gaps = |gw: &TestGateway| layer_count(gw, |l| l.purge_log_gaps.load(Ordering::Relaxed));
    mend_and_wait_up(&relay, &b);
    assert!(eventually(Duration::from_secs(10), || stored_entries(&b) == 0));
    assert_eq!(gaps(&b), 1);
    // It then follows the log from where it is: the 1000 purges left are read, and no other
    // gap is found.
    assert!(eventually(Duration::from_secs(10), || layer_count(
        &b,
        |l| l.purges_heard.load(Ordering::Relaxed)
    ) >= 1000));
    get(b.addr, "/r");
    assert_eq!(stored_entries(&b), 1);
    assert_eq!(gaps(&b), 1);
    // A, which read the log all along, found no gap.
    assert_eq!(gaps(&a), 0);
}

/// `[cache.redis] purge_log_length` (before, a constant 1000): the purge log keeps that many
/// purges, the newest; the ID of the newest trimmed away is kept for the gap check.
#[test]
fn the_purge_log_keeps_purge_log_length_purges() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let cfg = redis_cache_config(up.addr, &redis)
        .replace("[cache.redis]\n", "[cache.redis]\npurge_log_length = 3\n");
    let a = TestGateway::start(&cfg, D);
    assert!(eventually(Duration::from_secs(5), || log_followers(&redis) == 1));
    // Invalidations by POST (RFC 9111 §4.4), each logged as a purge of its URL.
    invalidate_all(&a, (0..5).map(|i| format!("/x{i}")));
    // Every purge logged was read back (its own included): the five were appended.
    assert!(eventually(Duration::from_secs(10), || layer_count(
        &a,
        |l| l.purges_heard.load(Ordering::Relaxed)
    ) == 5));
    assert_eq!(
        redis
            .command(&["XLEN", "ringway:cache:purge-log"])
            .as_deref(),
        Some(":3\r\n")
    );
    assert!(!redis.keys("ringway:cache:purge-log-trimmed").is_empty());
}

/// `[cache.redis] purge_retry_first` over 30 s, given without `purge_retry_max` (README:
/// 10 ms to 1 h): the gateway starts, shares its cache through Redis and follows the purge
/// log (RFC 9111 §4.4), the kept purges' longest wait being `purge_retry_first`. Before, the
/// config was refused at load: `purge_retry_max`, a key the file did not hold, kept its 30 s
/// default and "must be at least purge_retry_first".
#[test]
fn a_purge_retry_first_over_30s_given_alone_is_taken() {
    let redis = RedisServer::start();
    let (up, hits) = counting_origin("cache-control: max-age=600\r\n");
    let cfg = redis_cache_config(up.addr, &redis).replace(
        "[cache.redis]\n",
        "[cache.redis]\npurge_retry_first = \"2m\"\n",
    );
    let gw = TestGateway::start(&cfg, D);
    assert!(eventually(Duration::from_secs(5), || log_followers(&redis) == 1));
    assert_eq!(get(gw.addr, "/alone").text(), "v1");
    wait_stored_in_redis(&redis);
    let other = TestGateway::start(&cfg, D);
    let r = get(other.addr, "/alone");
    assert!(status_of(&r).contains("detail=redis"), "{r:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let parsed = ringway::config::Config::parse(&cfg, "c.toml").expect("taken");
    let max = parsed.cache.redis.as_ref().map(|r| r.purge_retry_max());
    assert_eq!(max, Some(Duration::from_secs(120)));
}

/// RFC 9111 §4.4: a worker that awaits more than 64 purges in Redis keeps a floor: no entry
/// received before it is taken from Redis until they are settled. A settlement that the
/// worker's full control mailbox refused was lost, and the floor (with the purges awaited)
/// stayed until the process ended: every entry Redis held from before it was a miss there.
/// The settlements now also say below which ticket every purge is settled, and the purge
/// log's listener posts that again after one was lost. Here Redis holds the purges' writes
/// (`CLIENT PAUSE WRITE`) while 65 invalidations are made, and the worker is kept busy, its
/// mailbox full, while Redis answers them.
#[test]
fn rfc9111_4_4_a_worker_s_floor_clears_after_its_settlement_was_lost_to_a_full_mailbox() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    // A timeout that outlasts the pause: the purges wait for Redis rather than fail.
    let cfg = format!(
        "[server]\nworkers = 1\n{}",
        redis_cache_config(up.addr, &redis).replace("timeout = \"200ms\"", "timeout = \"30s\"")
    );
    let gw = TestGateway::start(&cfg, D);
    let control = gw.gateway().control().clone();
    assert!(eventually(Duration::from_secs(5), || log_followers(&redis) == 1));
    let layer = control
        .ask(Duration::from_secs(2), |w| w.cache.shared().cloned())
        .unwrap()
        .remove(0)
        .expect("a layer");
    // The purges the worker awaits (`None`: its mailbox is full).
    let awaited = |c: &ringway::control::Control| {
        c.ask(Duration::from_secs(2), |w| {
            w.cache.pending_in_redis().map_or(0, |p| p.len())
        })
        .ok()
        .map(|n| n[0])
    };
    redis
        .command(&["CLIENT", "PAUSE", "60000", "WRITE"])
        .expect("pause");
    invalidate_all(&gw, (0..65).map(|i| format!("/x{i}")));
    // 64 awaited one by one, and the floor.
    assert_eq!(awaited(&control), Some(65));
    // The worker busy, its mailbox full.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (busy, is_busy) = std::sync::mpsc::channel::<()>();
    control
        .post(
            0,
            Box::new(move |_| {
                let _ = busy.send(());
                let _ = held.recv_timeout(Duration::from_secs(60));
            }),
        )
        .expect("posted");
    is_busy.recv_timeout(Duration::from_secs(10)).expect("busy");
    let mut filled = false;
    for _ in 0..2 * ringway::control::MAX_PENDING_JOBS {
        if control.post(0, Box::new(|_| {})).is_err() {
            filled = true;
            break;
        }
    }
    assert!(filled);
    // Redis answers the purges: their settlements find the mailbox full. A purge queued after
    // them is answered after them: once it is, every settlement was posted.
    redis.command(&["CLIENT", "UNPAUSE"]).expect("unpause");
    let (fenced, fence) = std::sync::mpsc::channel::<()>();
    layer.purge(
        &Purge {
            target: PurgeTarget::Url(ringway::cache::purge_url("test.local", "/fence")),
            soft: false,
        },
        None,
        Some(Box::new(move |_| {
            let _ = fenced.send(());
        })),
    );
    fence
        .recv_timeout(Duration::from_secs(30))
        .expect("answered");
    release.send(()).expect("released");
    assert!(
        eventually(Duration::from_secs(10), || awaited(&control) == Some(0)),
        "the floor stayed after its settlement was lost"
    );
}

/// RFC 9111 §4.4, issue 12: the purge log's entry IDs are Redis's clock. A host that had read
/// entries stamped ahead of the clock Redis keeps once it has lost its data (a Redis whose
/// clock was ahead, restarted without persistence on one that is right; here an entry stamped
/// an hour ahead, then `FLUSHALL`) found the gap and purged everything once, but kept its
/// cursor an hour ahead: every purge logged after, stamped behind it, was skipped until Redis's
/// clock passed it, and the host served copies purged everywhere else. Its cursor now goes
/// back to what the log holds.
#[test]
fn rfc9111_4_4_a_host_follows_the_purge_log_once_redis_lost_it_and_its_ids_went_back() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert!(eventually(Duration::from_secs(5), || log_followers(&redis) == 2));
    let heard = |gw: &TestGateway| layer_count(gw, |l| l.purges_heard.load(Ordering::Relaxed));
    let gaps = |gw: &TestGateway| layer_count(gw, |l| l.purge_log_gaps.load(Ordering::Relaxed));
    // A purge of a URL nobody stores, stamped an hour ahead.
    let ahead = format!("{}-0", (now() + 3600) * 1000);
    redis
        .command(&[
            "XADD",
            "ringway:cache:purge-log",
            &ahead,
            "p",
            "u\0test.local/none",
        ])
        .expect("xadd");
    assert!(eventually(Duration::from_secs(5), || heard(&a) == 1 && heard(&b) == 1));
    // Redis loses its data: both hosts find the gap (the entry they read last is gone).
    redis.command(&["FLUSHALL"]).expect("flushall");
    assert!(eventually(Duration::from_secs(10), || gaps(&a) == 1 && gaps(&b) == 1));
    // B stores /p; A purges it: logged now, an hour behind the entry read last.
    assert_eq!(get(b.addr, "/p").text(), "v1");
    assert!(status_of(&get(b.addr, "/p")).starts_with("ringway; hit"));
    hard_purge(
        &a,
        PurgeTarget::Url(ringway::cache::purge_url("test.local", "/p")),
    );
    assert!(
        eventually(Duration::from_secs(10), || get(b.addr, "/p").text() != "v1"),
        "B skipped the purge logged after Redis lost the log"
    );
    assert_eq!(heard(&b), 2);
    assert_eq!(gaps(&b), 1);
}

/// RFC 9111 §4.4, issue 12: past the 64 distinct purges a host keeps while Redis cannot be
/// reached, they are folded into one purge of everything, which the workers await and which
/// goes once Redis is back. Before, the oldest was given up, and forgotten by the workers:
/// once the link was up, a lookup brought its purged copy back from Redis, and the other
/// hosts never heard it.
#[test]
fn rfc9111_4_4_purges_past_the_64_kept_are_folded_into_a_purge_of_everything() {
    let redis = RedisServer::start();
    let relay = RedisRelay::start(redis.addr());
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let a = gateway_through(&relay, up.addr);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert_eq!(get(a.addr, "/p").text(), "v1");
    wait_stored_in_redis(&redis);
    // B holds /p, taken from Redis.
    assert!(status_of(&get(b.addr, "/p")).contains("detail=redis"));
    cut_and_purge_p(&relay, &a);
    let layer = |f: fn(&ringway::cache::redis::SharedLayer) -> u64| layer_count(&a, f);
    // 64 invalidations of other URLs, each failing in Redis: 65 distinct purges.
    invalidate_all(&a, (0..64).map(|i| format!("/x{i}")));
    assert!(eventually(Duration::from_secs(5), || layer(|l| l
        .purges_failed
        .load(Ordering::Relaxed))
        >= 65));
    mend_and_wait_up(&relay, &a);
    // A's lookup does not bring /p back from Redis.
    let r = get(a.addr, "/p");
    assert_ne!(r.text(), "v1", "{r:?}");
    // The purge of everything went: B drops its copy, nothing is left to send.
    assert!(eventually(Duration::from_secs(10), || get(b.addr, "/p")
        .text()
        != "v1"));
    assert!(eventually(Duration::from_secs(10), || layer(
        |l| l.unsent_purges() as u64
    ) == 0));
    assert_eq!(layer(|l| l.purges_given_up.load(Ordering::Relaxed)), 65);
    assert_ne!(get(a.addr, "/p").text(), "v1");
}

/// RFC 9111 §4.4, issue 12: the index set a purge by tag finds entries through outlives
/// every entry it lists. Before, each write set the set's expiry to its own entry's, so a
/// later entry with a shorter life (here 65 s against 660 s) shortened it: once it expired,
/// the longer-lived entry was left in Redis with no index, and a purge of the tag no longer
/// found it (any host's lookup then served the purged copy). Now an entry and its index sets
/// are written by one script, and a set's expiry is only ever lengthened.
#[test]
fn rfc9111_4_4_a_tag_s_index_set_in_redis_outlives_every_entry_it_lists() {
    let redis = RedisServer::start();
    let up = Upstream::start(|r: &Req| {
        let age = if r.target.starts_with("/long") {
            600
        } else {
            5
        };
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age={age}\r\nsurrogate-key: t\r\ncontent-length: 2\r\n\r\nok"
            )
            .into_bytes(),
        )
    });
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let ttl = |k: &str| -> i64 {
        redis
            .command(&["TTL", k])
            .and_then(|r| r.trim().strip_prefix(':')?.parse().ok())
            .unwrap_or(-3)
    };
    get(a.addr, "/long");
    wait_n_stored_in_redis(&redis, 1);
    assert!(eventually(Duration::from_secs(5), || ttl(
        "ringway:cache:t:t"
    ) > 600));
    get(a.addr, "/short");
    wait_n_stored_in_redis(&redis, 2);
    assert!(eventually(Duration::from_secs(5), || redis
        .command(&["SCARD", "ringway:cache:t:t"])
        .is_some_and(|r| r.starts_with(":2"))));
    let left = ttl("ringway:cache:t:t");
    assert!(left > 600, "the tag's set expires in {left} s");
    assert!(ttl("ringway:cache:u:test.local/short") <= 65);
}

/// A host with the trailing dot of an absolute name (RFC 1034 §3.1: `test.local.` is
/// `test.local`, as routing reads it) keys the same entry as without it, with or without a
/// port, so that a purge of the URL reaches what either spelling stored (RFC 9111 §4.4).
#[test]
fn a_host_with_a_trailing_dot_keys_the_same_entry_and_is_purged_with_it() {
    let (up, n) = counting_origin("cache-control: max-age=60\r\n");
    let (gw, api) = gateway_with_admin(up.addr);
    let purge = |url: &str| {
        request(
            api,
            format!("POST /cache/purge?url={url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .json()["purged"]
            .as_u64()
    };
    let get_host = |host: &str| {
        request(
            gw.addr,
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
    };
    for (stored_as, also, purged_as) in [
        ("test.local.", "Test.Local", "test.local/x"),
        ("test.local", "test.local.", "test.local./x"),
        ("test.local.:8080", "test.local:8080", "test.local:8080/x"),
    ] {
        let before = n.load(Ordering::SeqCst);
        assert!(
            status_of(&get_host(stored_as)).contains("fwd=uri-miss"),
            "{stored_as}"
        );
        assert!(
            status_of(&get_host(also)).contains("hit"),
            "{stored_as} then {also}"
        );
        assert_eq!(purge(purged_as), Some(1), "{purged_as}");
        assert!(
            status_of(&get_host(stored_as)).contains("fwd=uri-miss"),
            "{stored_as} purged"
        );
        assert_eq!(n.load(Ordering::SeqCst), before + 2);
        assert_eq!(purge(purged_as), Some(1));
    }
}

/// The admin API's `POST /cache/purge` (one URL, a prefix, a tag; refusals for a missing or
/// doubled target) and `GET /cache` (counters summed over the workers).
#[test]
fn admin_api_purges_by_url_prefix_and_tag_and_reports_counters() {
    let (up, n) = counting_origin("cache-control: max-age=60\r\nsurrogate-key: blue green\r\n");
    let (gw, api) = gateway_with_admin(up.addr);
    let admin = |method: &str, target: &str| {
        request(
            api,
            format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
    };
    let fill = || {
        for p in ["/a", "/docs/1", "/docs/2"] {
            get_h(gw.addr, p, "");
        }
    };
    fill();
    assert_eq!(n.load(Ordering::SeqCst), 3);
    let stats = admin("GET", "/cache").json();
    assert_eq!(stats["total"]["entries"], 3, "{stats}");
    assert_eq!(stats["per_worker"].as_array().map(Vec::len), Some(1));

    let r = admin("POST", "/cache/purge?url=test.local/a");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["purged"], 1);
    assert!(status_of(&get_h(gw.addr, "/a", "")).contains("fwd=uri-miss"));
    assert!(status_of(&get_h(gw.addr, "/docs/1", "")).contains("hit"));

    let r = admin("POST", "/cache/purge?prefix=http://test.local/docs/");
    assert_eq!(r.json()["purged"], 2, "{}", r.text());
    assert!(status_of(&get_h(gw.addr, "/docs/2", "")).contains("fwd=uri-miss"));

    // A soft purge by tag marks stale (the two objects stored since: /a and /docs/2): the
    // next answer revalidates with the origin.
    let before = n.load(Ordering::SeqCst);
    let r = admin("POST", "/cache/purge?tag=green&soft=1");
    assert_eq!(
        (r.json()["purged"].as_u64(), r.json()["soft"].as_bool()),
        (Some(2), Some(true)),
        "{}",
        r.text()
    );
    get_h(gw.addr, "/a", "");
    assert_eq!(n.load(Ordering::SeqCst), before + 1);

    for bad in [
        "/cache/purge",
        "/cache/purge?url=test.local/a&tag=x",
        "/cache/purge?all=yes",
        "/cache/purge?tag=x&soft=maybe",
        // A target given twice (however spelled): which one was meant cannot be told, and
        // purging only the first would answer 200 for a purge that did not happen.
        "/cache/purge?url=test.local/a&url=test.local/b",
        "/cache/purge?tag=x&%74ag=y",
        "/cache/purge?prefix=test.local/a&prefix=test.local/b",
        "/cache/purge?tag=x&soft=1&soft=0",
    ] {
        let r = admin("POST", bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let r = admin("POST", "/cache/purge?all=1");
    assert_eq!(r.status, 200);
    assert_eq!(admin("GET", "/cache").json()["total"]["entries"], 0);
}

/// An IPv6 literal Host is the address it names in the key too (RFC 3986 §3.2.2, RFC 5952
/// §4), as routing reads it: `[0::1]` and `[::1]` store one object, and an invalidation
/// through one spelling reaches the other (before, each spelling kept its own copy, and a POST
/// through `[::1]` left `[0::1]`'s served; review r12b).
#[test]
fn rfc5952_4_ipv6_literal_spellings_are_one_key() {
    let (up, n) = counting_origin("cache-control: max-age=600\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let at = |host: &str, method: &str| {
        request(
            gw.addr,
            format!("{method} /v6 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
    };
    assert_eq!(at("[0::1]", "GET").text(), "v1");
    for host in ["[::1]", "[0:0:0:0:0:0:0:1]", "[0000::0001]:80"] {
        let r = at(host, "GET");
        assert_eq!(r.text(), "v1", "{host}: {r:?}");
    }
    assert_eq!(at("[::1]", "POST").status, 200);
    assert_eq!(
        at("[0::1]", "GET").text(),
        "v3",
        "invalidated through another spelling"
    );
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

/// One route's stored answer is never another's: routes that split one URL by a header (a
/// canary here), each to its own upstream, keep entries apart (before, the canary's answer
/// was served from the stable route's entry); and a `key.ignore_host` route's entries are
/// not those of a request without Host on another route (before, both keyed `/p` with an
/// empty host). An invalidation of the URL reaches both routes' copies.
#[test]
fn routes_that_split_one_url_do_not_share_entries() {
    let (stable, _) = counting_origin("cache-control: max-age=600\r\n");
    let canary = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 6\r\n\r\ncanary"
                .to_vec(),
        )
    });
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n\
         [upstreams.canary]\nendpoints = [{{ address = \"{}\" }}]\n\
         [[routes]]\nname = \"canary\"\nheaders = {{ \"x-canary\" = \"1\" }}\nupstream = \"canary\"\ncache = {{}}\n\
         [[routes]]\nname = \"any-host\"\nhosts = [\"any.test\"]\nupstream = \"canary\"\ncache = {{ key = {{ ignore_host = true }} }}\n\
         [[routes]]\nupstream = \"up\"\ncache = {{}}\n",
        stable.addr, canary.addr
    );
    let gw = TestGateway::start(&toml, D);
    assert_eq!(get(gw.addr, "/p").text(), "v1");
    assert_eq!(get(gw.addr, "/p").text(), "v1");
    let r = get_h(gw.addr, "/p", "x-canary: 1\r\n");
    assert_eq!(r.text(), "canary", "{r:?}");
    assert_eq!(get(gw.addr, "/p").text(), "v1");
    // The ignore_host route stores `/q` for any.test; a request without Host on the
    // catch-all route is a URL of its own.
    let r = request(gw.addr, b"GET /q HTTP/1.1\r\nHost: any.test\r\n\r\n");
    assert_eq!(r.text(), "canary");
    let r = request(gw.addr, b"GET /q HTTP/1.0\r\n\r\n");
    assert_eq!(r.text(), "v2", "{r:?}");
    // An unsafe request on one route invalidates the URL on both.
    let r = request(
        gw.addr,
        b"POST /p HTTP/1.1\r\nHost: test.local\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(get(gw.addr, "/p").text(), "v4");
    let before = canary.hits();
    assert_eq!(get_h(gw.addr, "/p", "x-canary: 1\r\n").text(), "canary");
    assert_eq!(
        canary.hits(),
        before + 1,
        "the canary's copy was invalidated too"
    );
}

/// RFC 9111 §4.4 against §4.3.5: a HEAD sent before a POST invalidated its URL, answered
/// after it with the stored GET's validators, does not freshen the invalidated GET back into
/// the store (review r12a M2: before, the next GET was a hit with the pre-POST body).
#[test]
fn rfc9111_4_4_a_head_in_flight_across_an_invalidation_does_not_restore_the_get() {
    let version = Arc::new(AtomicUsize::new(1));
    let (arrived, gate) = (Event::new(), Event::new());
    let (v2, a2, g2) = (version.clone(), arrived.clone(), gate.clone());
    let up = Upstream::start(move |req| {
        let v = v2.load(Ordering::SeqCst);
        match req.method.as_str() {
            "POST" => {
                v2.store(2, Ordering::SeqCst);
                Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
            }
            "HEAD" => {
                // The origin's answer as of before the POST, sent after it.
                a2.set();
                g2.wait(Duration::from_secs(10));
                Reply::Raw(
                    format!(
                        "HTTP/1.1 200 OK\r\netag: \"e{v}\"\r\ncache-control: max-age=600\r\ncontent-length: 2\r\n\r\n"
                    )
                    .into_bytes(),
                )
            }
            _ => Reply::Raw(
                format!(
                    "HTTP/1.1 200 OK\r\netag: \"e{v}\"\r\ncache-control: max-age=600\r\ncontent-length: 2\r\n\r\nv{v}"
                )
                .into_bytes(),
            ),
        }
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/x").text(), "v1");
    let addr = gw.addr;
    let head = std::thread::spawn(move || {
        request(
            addr,
            b"HEAD /x HTTP/1.1\r\nHost: test.local\r\nCache-Control: no-cache\r\n\r\n",
        )
        .status
    });
    assert!(arrived.wait(Duration::from_secs(10)), "the HEAD is out");
    let r = request(
        gw.addr,
        b"POST /x HTTP/1.1\r\nHost: test.local\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    gate.set();
    assert_eq!(head.join().unwrap(), 200);
    let r = get(gw.addr, "/x");
    assert_eq!(r.text(), "v2", "{r:?}");
}

/// RFC 9111 §4.4 at the cost of the URL alone: an unsafe request invalidates its target
/// without reading the rest of the store (before, each one read every stored object on every
/// worker: with a 64 MiB store of 1 KiB objects, a POST cost some 2 ms of each worker's time,
/// and any client could send them). The invalidated URL is a miss from then on, the copy
/// stored after the invalidation is served, other URLs keep theirs, and the invalidated
/// objects leave the store (at a lookup, or at a sweep after 1,024 invalidated URLs).
#[test]
fn rfc9111_4_4_an_invalidation_does_not_read_the_whole_store() {
    let (up, n) = counting_origin("cache-control: max-age=600\r\n");
    let (gw, api) = gateway_with_admin(up.addr);
    let stats =
        || request(api, b"GET /cache HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").json()["total"].clone();
    let mut c = Client::connect(gw.addr);
    let mut send = |m: &str, path: &str| {
        let body = if m == "POST" { "x" } else { "" };
        c.send(
            format!(
                "{m} {path} HTTP/1.1\r\nHost: test.local\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let r = c.read_response().expect("an answer");
        assert_eq!(r.status, 200, "{m} {path}");
        r
    };
    for i in 0..200 {
        send("GET", &format!("/o/{i}"));
    }
    assert_eq!(stats()["entries"], 200);
    for _ in 0..10 {
        send("POST", "/o/7");
    }
    let s = stats();
    assert_eq!(s["purge_scanned"], 0, "{s}");
    // The invalidated URL: a miss, stored again, then a hit (the new copy is not covered).
    let before = n.load(Ordering::SeqCst);
    let fetched = send("GET", "/o/7").text();
    assert_eq!(
        n.load(Ordering::SeqCst),
        before + 1,
        "the invalidated copy is not served"
    );
    assert_eq!(send("GET", "/o/7").text(), fetched);
    assert_eq!(
        send("GET", "/o/8").text(),
        "v9",
        "another URL keeps its copy"
    );
    assert_eq!(n.load(Ordering::SeqCst), before + 1);
    let s = stats();
    assert_eq!(
        (s["entries"].as_u64(), s["purged"].as_u64()),
        (Some(200), Some(1)),
        "{s}"
    );
    // 1,024 invalidated URLs: one sweep reads the store once and takes every invalidated
    // copy out (here /o/0 to /o/99, stored before), whether looked up again or not.
    for i in 0..1024 {
        let path = if i < 100 {
            format!("/o/{i}")
        } else {
            format!("/p/{i}")
        };
        send("POST", &path);
    }
    let s = stats();
    assert_eq!(s["entries"], 100, "{s}");
    let scanned = s["purge_scanned"].as_u64().unwrap_or(0);
    assert!((100..=200).contains(&scanned), "one sweep: {s}");
    assert_eq!(
        send("GET", "/o/150").text(),
        "v151",
        "kept through the sweep"
    );
    let before = n.load(Ordering::SeqCst);
    send("GET", "/o/50");
    assert_eq!(n.load(Ordering::SeqCst), before + 1, "swept");
}

/// `GET /metrics` on the admin API: the gateway's families and the cache's, one valid
/// Prometheus text exposition.
#[test]
fn admin_metrics_include_the_cache_families() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let (gw, api) = gateway_with_admin(up.addr);
    let mut c = Client::connect(gw.addr);
    for _ in 0..3 {
        c.send(b"GET /m HTTP/1.1\r\nHost: test.local\r\n\r\n");
        assert_eq!(c.read_response().expect("an answer").status, 200);
    }
    let r = request(api, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    ringway::metrics::prom::check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for line in [
        "ringway_cache_misses_total 1",
        "ringway_cache_hits_total 2",
        "ringway_cache_stores_total 1",
        "ringway_cache_entries 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("ringway_route_requests_total{") && l.ends_with(" 3")),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Conformance edge cases (the http-tests cache-tests suite's required tests).

#[test]
fn rfc9111_5_2_directives_with_whitespace_around_equals_are_ignored() {
    for cc in ["max-age =3600", "max-age= 3600", "s-maxage =3600"] {
        let fields: &'static str = Box::leak(format!("cache-control: {cc}\r\n").into_boxed_str());
        let (up, _) = counting_origin(fields);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        assert_eq!(get(gw.addr, "/ws").text(), "v1");
        assert_eq!(get(gw.addr, "/ws").text(), "v2", "{cc} is not max-age=3600");
    }
    // The same directive written as the grammar says is honoured.
    let (up, _) = counting_origin("cache-control: max-age=3600\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/ws");
    assert_eq!(get(gw.addr, "/ws").text(), "v1");
}

#[test]
fn rfc9110_5_6_7_an_expires_not_in_an_http_date_form_is_in_the_past() {
    for exp in [
        // 1-digit hour, dashes with a short day name, doubled spaces, UTC, 2-digit year.
        "Thu, 18 Aug 2050 2:01:18 GMT",
        "Thu, 18-Aug-2050 02:01:18 GMT",
        "Thu, 18  Aug  2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02:01:18 UTC",
        "Thu, 18 Aug 50 02:01:18 GMT",
        "Thu 18 Aug 2050 02:01:18 GMT",
    ] {
        let fields: &'static str = Box::leak(format!("expires: {exp}\r\n").into_boxed_str());
        let (up, _) = counting_origin(fields);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        get(gw.addr, "/x");
        assert_eq!(get(gw.addr, "/x").text(), "v2", "{exp} is not a date");
    }
    for exp in [
        "Thu, 18 Aug 2050 02:01:18 GMT",
        "Thursday, 18-Aug-50 02:01:18 GMT",
        "Thu Aug 18 02:01:18 2050",
    ] {
        let fields: &'static str = Box::leak(format!("expires: {exp}\r\n").into_boxed_str());
        let (up, _) = counting_origin(fields);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        get(gw.addr, "/x");
        assert_eq!(get(gw.addr, "/x").text(), "v1", "{exp} is a future date");
    }
}

/// The README's "Conformance runs" config is a whole config that loads, with one worker: each
/// worker keeps its own store, and the cache-tests suite sends the requests of one test on
/// any of its pooled connections, so with more workers a stored response looks unused.
#[test]
fn readme_conformance_config_loads_with_one_worker() {
    let readme = include_str!("../README.md");
    let at = readme
        .find("**Conformance runs.**")
        .expect("README has its Conformance runs paragraph");
    let block = readme[at..]
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block follows");
    let cfg = ringway::config::Config::parse(block, "README.md").expect("the block loads");
    assert_eq!(cfg.server.workers, 1);
    assert_eq!(cfg.routes.len(), 1);
    assert!(cfg.routes[0].cache.is_some(), "{block}");
}

/// RFC 9111 §4.1 lets a cache normalise selecting fields "where values are defined to be
/// case-insensitive": language ranges are (RFC 4647 §2), so `Accept-Language: en, de` and
/// `eN, De` select one variant (cache-tests `vary-normalise-lang-case`); other languages or
/// another order still do not.
#[test]
fn rfc9111_4_1_accept_language_is_compared_without_regard_to_case() {
    let (up, _) = counting_origin("cache-control: max-age=3600\r\nvary: Accept-Language\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(
        get_h(gw.addr, "/l", "accept-language: en, de\r\n").text(),
        "v1"
    );
    assert_eq!(
        get_h(gw.addr, "/l", "accept-language: eN, De\r\n").text(),
        "v1"
    );
    assert_eq!(
        get_h(gw.addr, "/l", "accept-language: EN,DE\r\n").text(),
        "v1"
    );
    assert_eq!(
        get_h(gw.addr, "/l", "accept-language: en, fr\r\n").text(),
        "v2"
    );
    assert_eq!(
        get_h(gw.addr, "/l", "accept-language: de, en\r\n").text(),
        "v3"
    );
    // Another selecting field keeps its case.
    let (up, _) = counting_origin("cache-control: max-age=3600\r\nvary: Foo\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get_h(gw.addr, "/f", "foo: a\r\n").text(), "v1");
    assert_eq!(get_h(gw.addr, "/f", "foo: A\r\n").text(), "v2");
}

/// RFC 9111 §4.1 lets a cache normalise a selecting field "in a way that is known to have
/// identical semantics, according to the header field's specification". For Accept-Language
/// (RFC 9110 §12.5.4, §12.4.2): a weight is a number (`q=0.50` is `q=0.5`, `q=1` is no
/// weight), and ranges of different weights mean the same in any order. Not merged: equal
/// weights in another order (§12.5.4: some recipients read the order as a preference; the
/// cache-tests `vary-normalise-lang-order` expects that merge), another set of ranges that
/// the origin happened to answer alike (`vary-normalise-lang-select`), a `q=0` range left out,
/// and a value that is not an Accept-Language (kept in its own case).
#[test]
fn rfc9111_4_1_accept_language_weights_are_normalised_per_rfc9110_12_5_4() {
    let (up, _) = counting_origin(
        "cache-control: max-age=3600
vary: Accept-Language
",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let lang = |v: &str| get_h(gw.addr, "/l", &format!("accept-language: {v}\r\n"));
    miss(&lang("de;q=0.5, en"), "v1");
    hit(&lang("en, de;q=0.5"), "v1");
    hit(&lang("EN ; Q=1.000,de;q=0.500"), "v1");
    let two_lines = get_h(
        gw.addr,
        "/l",
        "accept-language: de;q=0.50\r\naccept-language: en;q=1\r\n",
    );
    hit(&two_lines, "v1");
    // Equal weights in another order: another variant.
    miss(&lang("fr, it"), "v2");
    miss(&lang("it, fr"), "v3");
    // Another set of ranges, though the origin could answer it the same.
    miss(&lang("fr;q=0.5, en"), "v4");
    // A range refused with q=0 is not the range left out.
    miss(&lang("en, de;q=0"), "v5");
    hit(&lang("de;q=0.000, en"), "v5");
    miss(&lang("en"), "v6");
    // Not an Accept-Language (a parameter other than q): compared as sent, case included.
    miss(&lang("EN;level=1, de;q=0.5"), "v7");
    miss(&lang("en;level=1, de;q=0.5"), "v8");
    hit(&lang("EN;level=1 ,  de;q=0.5"), "v7");
    assert_eq!(up.hits(), 8);
}

/// RFC 9111 §4.2: "a cache recipient SHOULD match the field value case-insensitively"
/// (dates are case-sensitive in RFC 9110 §5.6.7, relaxed for caches); the cache-tests
/// suite's `freshness-expires-wrong-case-month` and `-tz`.
#[test]
fn rfc9111_4_2_a_cache_reads_the_month_and_zone_of_expires_in_any_case() {
    for exp in [
        "Thu, 18 AUG 2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02:01:18 gMT",
        "Thursday, 18-aug-50 02:01:18 gmt",
        "Thu AUG 18 02:01:18 2050",
    ] {
        let fields: &'static str = Box::leak(format!("expires: {exp}\r\n").into_boxed_str());
        let (up, _) = counting_origin(fields);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        get(gw.addr, "/case");
        assert_eq!(get(gw.addr, "/case").text(), "v1", "{exp} is a future date");
    }
    // A zone other than GMT stays invalid, whatever its case (RFC 9111 §4.2).
    let (up, _) = counting_origin("expires: Thu, 18 Aug 2050 02:01:18 utc\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/case");
    assert_eq!(get(gw.addr, "/case").text(), "v2");
}

#[test]
fn rfc9111_5_1_a_list_valued_age_counts_by_its_first_member() {
    for (age, fresh) in [("7200, 7200", false), ("7200,0", false), ("0, 7200", true)] {
        let fields: &'static str =
            Box::leak(format!("cache-control: max-age=3600\r\nage: {age}\r\n").into_boxed_str());
        let (up, _) = counting_origin(fields);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        get(gw.addr, "/age");
        let want = if fresh { "v1" } else { "v2" };
        assert_eq!(get(gw.addr, "/age").text(), want, "Age: {age}");
    }
}

#[test]
fn rfc9111_3_1_fields_listed_in_connection_are_not_stored() {
    let (up, _) = counting_origin(
        "cache-control: max-age=3600\r\nconnection: a, b\r\na: 1\r\nb: 2\r\nc: 3\r\n",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/conn");
    let b = get(gw.addr, "/conn");
    assert_eq!(b.text(), "v1");
    assert_eq!(b.header("c"), Some("3"), "{b:?}");
    for gone in ["a", "b", "connection"] {
        assert!(!b.has(gone), "{gone}: {b:?}");
    }
}

#[test]
fn rfc9111_4_4_an_unknown_method_invalidates_the_target_and_content_location() {
    let (up, _) = counting_origin("cache-control: max-age=3600\r\ncontent-location: /t/cl\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/t").text(), "v1");
    assert_eq!(get(gw.addr, "/t/cl").text(), "v2");
    assert_eq!(get(gw.addr, "/t/cl").text(), "v2");
    let r = request(
        gw.addr,
        b"M-SEARCH /t HTTP/1.1\r\nHost: test.local\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(r.status, 200);
    assert_eq!(get(gw.addr, "/t").text(), "v4");
    assert_eq!(get(gw.addr, "/t/cl").text(), "v5");
}

#[test]
fn rfc9111_4_3_4_a_304_updates_set_cookie_and_content_type_on_a_set_cookie_store_route() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        if req.header("if-none-match") == Some("\"e\"") {
            return Reply::Raw(
                format!("HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\ncache-control: max-age=3600\r\nset-cookie: a=c\r\ncontent-type: text/plain;charset=utf-8\r\nx-n: {i}\r\n\r\n")
                    .into_bytes(),
            );
        }
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\netag: \"e\"\r\ncache-control: max-age=0\r\nset-cookie: a=b\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\nbody"
                .to_vec(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "set_cookie = \"store\"", ""), D);
    assert_eq!(get(gw.addr, "/sc").header("set-cookie"), Some("a=b"));
    for _ in 0..2 {
        let b = get(gw.addr, "/sc");
        assert_eq!(b.text(), "body");
        assert_eq!(b.header("set-cookie"), Some("a=c"), "{b:?}");
        assert_eq!(b.header("content-type"), Some("text/plain;charset=utf-8"));
        assert_eq!(b.header("x-n"), Some("2"), "{b:?}");
    }
    assert_eq!(up.hits(), 2);
}

#[test]
fn rfc5861_4_stale_if_error_does_not_apply_past_its_window() {
    // The response's own window (1 s) is over at once (Age: 5), whatever the route's default.
    for (fields, req, route) in [
        (
            "cache-control: max-age=0, stale-if-error=1\r\nage: 5\r\n",
            "",
            "",
        ),
        (
            "cache-control: max-age=0, stale-if-error=1\r\nage: 5\r\n",
            "",
            "stale_if_error = \"60s\"",
        ),
        // The request's window (1 s) wins over the route's 60 s.
        (
            "cache-control: max-age=0\r\netag: \"w\"\r\nage: 5\r\n",
            "Cache-Control: stale-if-error=1\r\n",
            "stale_if_error = \"60s\"",
        ),
    ] {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let up = Upstream::start(move |_| {
            if n2.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::Raw(
                    format!("HTTP/1.1 200 OK\r\n{fields}content-length: 2\r\n\r\nok").into_bytes(),
                )
            } else {
                Reply::Raw(b"HTTP/1.1 500 Oops\r\ncontent-length: 4\r\n\r\noops".to_vec())
            }
        });
        let gw = TestGateway::start(&cache_config(up.addr, route, ""), D);
        assert_eq!(get(gw.addr, "/sie").text(), "ok");
        let r = get_h(gw.addr, "/sie", req);
        assert_eq!(
            (r.status, r.text().as_str()),
            (500, "oops"),
            "{fields} {req} {route}: {r:?}"
        );
        assert_eq!(up.hits(), 2);
    }
}

/// RFC 9211 §2: a cache names itself in `Cache-Status`; the PURGE answer uses the configured
/// `[cache] name` like every other answer.
#[test]
fn rfc9211_2_purge_answers_carry_the_configured_cache_name() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let toml = format!(
        "[cache]\nname = \"edge-1\"\n{}",
        auth_cache_config(up.addr, "purge = true")
    );
    let gw = TestGateway::start(&toml, D);
    let key = "x-api-key: alice-key\r\n";
    let a = get_h(gw.addr, "/n", key);
    assert!(status_of(&a).starts_with("edge-1;"), "{a:?}");
    let r = request(
        gw.addr,
        format!("PURGE /n HTTP/1.1\r\nHost: test.local\r\n{key}\r\n").as_bytes(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(status_of(&r).starts_with("edge-1;"), "{r:?}");
}

/// The cache's own answers (a 504 for `only-if-cached`, hits, a PURGE result) keep a
/// pipelined connection in step: each request is answered once, in order, from the right byte.
/// A PURGE whose body the cache never reads has that body read and thrown away (RFC 9112
/// §6.3: the next request starts after it), so the connection goes on, and the body (shaped
/// like a request) is never taken for one.
#[test]
fn cache_made_answers_keep_a_pipelined_connection_in_step() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&auth_cache_config(up.addr, "purge = true"), D);
    let key = "x-api-key: alice-key\r\n";
    let mut c = Client::connect(gw.addr);
    c.send(
        format!(
            "GET /p HTTP/1.1\r\nHost: test.local\r\n{key}Cache-Control: only-if-cached\r\n\r\n\
             GET /p HTTP/1.1\r\nHost: test.local\r\n{key}\r\n\
             GET /p HTTP/1.1\r\nHost: test.local\r\n{key}\r\n\
             PURGE /p HTTP/1.1\r\nHost: test.local\r\n{key}Content-Length: 26\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n\
             GET /p HTTP/1.1\r\nHost: test.local\r\n{key}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let mut got = Vec::new();
    while let Some(r) = c.read_response() {
        got.push((
            r.status,
            r.text(),
            r.header("connection").map(str::to_string),
        ));
        assert!(got.len() <= 5, "{got:?}");
    }
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[0].0, 504, "{got:?}");
    assert_eq!((got[1].0, got[1].1.as_str()), (200, "v1"), "{got:?}");
    assert_eq!((got[2].0, got[2].1.as_str()), (200, "v1"), "{got:?}");
    assert_eq!(got[3].0, 200, "{got:?}");
    assert!(got[3].1.contains("\"purged\":1"), "{got:?}");
    assert_ne!(got[3].2.as_deref(), Some("close"), "{got:?}");
    // Purged: fetched again.
    assert_eq!((got[4].0, got[4].1.as_str()), (200, "v2"), "{got:?}");
    assert!(up.targets().iter().all(|t| t == "/p"), "{:?}", up.targets());
}

/// RFC 9112 §7.1 and §6.3: a chunked PURGE body is read to its last chunk and thrown away,
/// and the GET pipelined behind it gets its own answer, in order, on the same connection. A
/// GET that carries a body before it is forwarded with its body (RFC 9110 §9.3.1: not
/// answered from the store) and the connection goes on the same way.
#[test]
fn purge_with_a_chunked_body_keeps_the_connection_for_the_next_request() {
    for d in DRIVERS {
        let (up, _) = counting_origin("cache-control: max-age=60\r\n");
        let gw = TestGateway::start(&auth_cache_config(up.addr, "purge = true"), d);
        let key = "x-api-key: alice-key\r\n";
        assert_eq!(get_h(gw.addr, "/q", key).text(), "v1");
        let mut c = Client::connect(gw.addr);
        c.send(
            format!(
                "GET /q HTTP/1.1\r\nHost: test.local\r\n{key}Content-Length: 5\r\n\r\nhello\
                 PURGE /q HTTP/1.1\r\nHost: test.local\r\n{key}Transfer-Encoding: chunked\r\n\r\n\
                 5\r\nGET /\r\n15\r\nsmuggled HTTP/1.1\r\n\r\n\r\n0\r\n\r\n\
                 GET /q HTTP/1.1\r\nHost: test.local\r\n{key}\r\n"
            )
            .as_bytes(),
        );
        let bodied = c.read_response().expect("the GET with a body");
        assert_eq!(
            (bodied.status, bodied.text().as_str()),
            (200, "v2"),
            "{d:?}"
        );
        assert!(status_of(&bodied).contains("fwd=bypass"), "{bodied:?}");
        let purged = c.read_response().expect("the PURGE answer");
        assert_eq!(purged.status, 200, "{d:?} {purged:?}");
        assert!(purged.text().contains("\"purged\":1"), "{purged:?}");
        assert_ne!(purged.header("connection"), Some("close"), "{purged:?}");
        let next = c.read_response().expect("the GET after the PURGE");
        assert_eq!((next.status, next.text().as_str()), (200, "v3"), "{d:?}");
        assert!(up.targets().iter().all(|t| t == "/q"), "{:?}", up.targets());
    }
}

/// A PURGE body that cannot be thrown away within the drain bound (a Content-Length over
/// 64 KiB, or a malformed chunk size, RFC 9112 §7.1) is answered with `Connection: close`,
/// and nothing after it is read as a request.
#[test]
fn purge_with_a_large_or_malformed_body_closes_the_connection() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&auth_cache_config(up.addr, "purge = true"), D);
    let key = "x-api-key: alice-key\r\n";
    for body_head in [
        "Content-Length: 1000000\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(
            format!(
                "PURGE /r HTTP/1.1\r\nHost: test.local\r\n{key}{body_head}\
                 GET /smuggled HTTP/1.1\r\nHost: test.local\r\n{key}\r\n"
            )
            .as_bytes(),
        );
        let r = c.read_response().expect("the PURGE answer");
        assert_eq!(r.status, 200, "{body_head:?} {r:?}");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        assert!(
            c.read_response().is_none(),
            "{body_head:?}: one answer only"
        );
    }
    assert_eq!(up.hits(), 0);
}

/// The Redis layer (RFC 9111 §4: a cache answers from what it stores; here the store shared
/// through Redis): a worker asks Redis and sleeps on its doorbell until the link's thread has
/// the answer, so the lookup ends with a ring, not a poll. A Redis that does not answer
/// (paused) is a miss once `timeout` passes: the origin answers (fail open).
#[test]
fn redis_lookup_wakes_the_worker_by_its_doorbell_and_a_paused_redis_fails_open() {
    for d in DRIVERS {
        let redis = RedisServer::start();
        let (up, _) = counting_origin("cache-control: max-age=600\r\n");
        let a = TestGateway::start(&redis_cache_config(up.addr, &redis), d);
        let b = TestGateway::start(&redis_cache_config(up.addr, &redis), d);
        assert_eq!(get(a.addr, "/bell").text(), "v1");
        wait_stored_in_redis(&redis);
        let rung = |gw: &TestGateway| -> u64 {
            gw.gateway()
                .control()
                .ask(Duration::from_secs(2), |w| {
                    w.cache.shared().map_or(0, |l| l.link().doorbells.rung())
                })
                .unwrap()
                .into_iter()
                .max()
                .unwrap_or(0)
        };
        let r = get(b.addr, "/bell");
        assert_eq!(r.text(), "v1", "{d:?}");
        assert!(status_of(&r).contains("detail=redis"), "{d:?} {r:?}");
        // Every worker shares one link: its list holds the doorbells of those that waited.
        assert!(rung(&b) >= 1, "{d:?}: the answer came by a ring");
        assert_eq!(up.hits(), 1);

        assert!(redis
            .command(&["CLIENT", "PAUSE", "3000", "ALL"])
            .is_some_and(|r| r.starts_with("+OK")));
        let t0 = std::time::Instant::now();
        let r = get(b.addr, "/paused");
        assert_eq!((r.status, r.text().as_str()), (200, "v2"), "{d:?}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(up.hits(), 2);
    }
}

/// Reads from `s` until `pat` has arrived (bounded by the socket's read timeout); false when
/// the connection ends first.
fn read_until(s: &mut std::net::TcpStream, got: &mut Vec<u8>, pat: &[u8]) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    while !got.windows(pat.len()).any(|w| w == pat) {
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{e}: {:?}", String::from_utf8_lossy(got)),
        }
    }
    true
}

/// Reads until the peer closes (bounded by the read timeout).
fn read_to_close(s: &mut std::net::TcpStream, got: &mut Vec<u8>) {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{e}: {:?}", String::from_utf8_lossy(got)),
        }
    }
}

/// A chunked origin answer for coalescing tests: its head and first chunk ("first"), then,
/// once the test sets `go`, `rest` (more chunks, the last chunk, or nothing before a close).
fn chunked_origin(go: Arc<Event>, rest: &'static [u8], close: bool) -> Upstream {
    Upstream::start(move |_| {
        let mut steps = vec![
            Step::Write(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n"
                    .to_vec(),
            ),
            Step::Await(go.clone()),
            Step::Write(rest.to_vec()),
        ];
        if close {
            steps.push(Step::Close);
        }
        Reply::Script(steps)
    })
}

/// Starts the leader's fetch of `path` and a waiter that joins it; returns the leader and the
/// waiter's socket once the waiter has received the first chunk ("first").
fn leader_and_waiter(
    gw: &TestGateway,
    up: &Upstream,
    path: &str,
) -> (Client, std::net::TcpStream, Vec<u8>) {
    use std::io::Write;
    let mut leader = Client::connect(gw.addr);
    leader.send(format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes());
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 1));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    // The origin sends the rest only after this: the waiter got the first chunk while the
    // fetch was still going.
    assert!(read_until(&mut s, &mut got, b"first"), "{got:?}");
    (leader, s, got)
}

/// RFC 9111 §4 (a response the cache is receiving serves the requests collapsed onto it) and
/// RFC 9112 §7.1: a waiter on a chunked fetch receives the body as it arrives, re-chunked, and
/// the last chunk only when the fetch is complete; the connection then goes on.
#[test]
fn rfc9112_7_1_coalesced_waiters_receive_a_chunked_body_as_it_arrives() {
    use std::io::Write;
    for d in DRIVERS {
        let go = Event::new();
        let up = chunked_origin(go.clone(), b"7\r\n-second\r\n0\r\n\r\n", false);
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let (mut leader, mut s, mut got) = leader_and_waiter(&gw, &up, "/chunky");
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.contains("collapsed"), "{d:?} {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{text}"
        );
        assert!(!text.contains("second"), "{text}");
        assert!(!text.contains("\r\n0\r\n\r\n"), "not complete yet: {text}");
        go.set();
        assert!(read_until(&mut s, &mut got, b"\r\n0\r\n\r\n"), "{got:?}");
        let text = String::from_utf8_lossy(&got).to_string();
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(body, "5\r\nfirst\r\n7\r\n-second\r\n0\r\n\r\n", "{d:?}");
        assert_eq!(leader.read_response().unwrap().text(), "first-second");
        // The same connection goes on: the next request is a hit.
        s.write_all(b"GET /chunky HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut next = Vec::new();
        read_to_close(&mut s, &mut next);
        let next = String::from_utf8_lossy(&next).to_string();
        assert!(next.starts_with("HTTP/1.1 200"), "{next}");
        assert!(next.contains("; hit"), "{next}");
        assert!(next.ends_with("\r\n\r\nfirst-second"), "{next}");
        assert_eq!(up.hits(), 1);
    }
}

/// RFC 9112 §8: a chunked fetch that fails part way (the origin closes before the last
/// chunk) cuts its waiters too: they get the chunks that came and no last chunk, so their
/// clients see an incomplete message; nothing is stored.
#[test]
fn rfc9112_8_a_chunked_fetch_that_fails_part_way_cuts_its_waiters() {
    let go = Event::new();
    let up = chunked_origin(go.clone(), b"7\r\n-second\r\n", true);
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let (_leader, mut s, mut got) = leader_and_waiter(&gw, &up, "/broken");
    go.set();
    read_to_close(&mut s, &mut got);
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.contains("collapsed"), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "cut, not complete: {text}");
    // Nothing was stored: the next request goes to the origin (which fails the same way).
    let mut again = Client::connect(gw.addr);
    again.send(b"GET /broken HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 2));
}

/// RFC 9111 §3 lets a cache decline to store a response, not to cut it: a chunked body that
/// outgrows `max_object_bytes` while a waiter streams it is not stored, and still reaches that
/// waiter whole with its last chunk (RFC 9112 §7.1), as it reaches the fetching client.
#[test]
fn rfc9111_3_a_chunked_body_over_max_object_bytes_reaches_its_waiters_and_its_fetcher_whole() {
    let go = Event::new();
    let up = chunked_origin(go.clone(), b"a\r\n0123456789\r\n0\r\n\r\n", false);
    let gw = TestGateway::start(&cache_config(up.addr, "max_object_bytes = 8", ""), D);
    let (mut leader, mut s, mut got) = leader_and_waiter(&gw, &up, "/big");
    go.set();
    let whole = read_until(&mut s, &mut got, b"a\r\n0123456789\r\n0\r\n\r\n");
    assert!(whole, "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(leader.read_response().unwrap().text(), "first0123456789");
    assert_eq!(get(gw.addr, "/big").text(), "first0123456789");
    assert_eq!(up.hits(), 2, "not stored");
}

/// RFC 9111 §4.1: "If (after any normalization that might take place) a header field is
/// absent from a request, it can only match another request if it is also absent there."
/// For `Accept-Encoding` the difference matters (RFC 9110 §12.5.3): absent, any coding is
/// acceptable; empty, or every coding refused with `q=0`, only the identity is. A variant
/// stored for a request without the field is not served to one with an empty value.
#[test]
fn rfc9111_4_1_an_absent_vary_field_matches_only_an_absent_one() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: accept-encoding\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get_h(gw.addr, "/v", "").text(), "v1");
    let empty = get_h(gw.addr, "/v", "Accept-Encoding:\r\n");
    assert_eq!(empty.text(), "v2", "{empty:?}");
    assert!(status_of(&empty).contains("fwd=vary-miss"), "{empty:?}");
    // Every coding refused normalises to the empty set: the same variant as the empty field.
    let refused = get_h(gw.addr, "/v", "Accept-Encoding: gzip;q=0\r\n");
    assert_eq!(refused.text(), "v2", "{refused:?}");
    assert!(status_of(&refused).contains("hit"), "{refused:?}");
    // Absent again: the first variant.
    let absent = get_h(gw.addr, "/v", "");
    assert_eq!(absent.text(), "v1", "{absent:?}");
    assert!(status_of(&absent).contains("hit"), "{absent:?}");
    // Another field: absent and empty are told apart the same way.
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: x-tenant\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get_h(gw.addr, "/t", "X-Tenant:\r\n").text(), "v1");
    assert_eq!(get_h(gw.addr, "/t", "").text(), "v2");
    assert_eq!(get_h(gw.addr, "/t", "X-Tenant: \r\n").text(), "v1");
    assert_eq!(up.hits(), 2);
}

/// RFC 9111 §4.1 normalises a selecting field only "in a way that is known to have identical
/// semantics". In Accept-Encoding (RFC 9110 §12.5.3) a coding refused with `q=0` can change
/// what is acceptable: `*, gzip;q=0` accepts every coding but gzip, `*` every one, so what the
/// origin answered to `*` (a gzip body, say) is not served to it; `gzip, identity;q=0` refuses
/// the unencoded body that `gzip` accepts. Before, every refused coding was left out of the
/// compared value: the client that refused gzip got the variant stored for `*`. A refused
/// coding that is not acceptable either way (not listed, no `*`) is still left out.
#[test]
fn rfc9111_4_1_a_refused_coding_that_changes_what_is_acceptable_is_not_normalised_away() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: accept-encoding\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let ae = |v: &str| get_h(gw.addr, "/e", &format!("Accept-Encoding: {v}\r\n"));
    miss(&ae("*"), "v1");
    miss(&ae("*, gzip;q=0"), "v2");
    hit(&ae("*, GZIP ; q=0.0"), "v2");
    hit(&ae("*"), "v1");
    miss(&ae("gzip"), "v3");
    miss(&ae("gzip, identity;q=0"), "v4");
    hit(&ae("gzip, zstd;q=0"), "v3");
    assert_eq!(up.hits(), 4);
}

/// RFC 9111 §4.1 with RFC 9110 §12.4.2, §12.5.3: a weight that is not a `qvalue` (`q=`,
/// `q=.`, `q=00`, `q=0.0000`) is no refusal: what it means is not specified, and an origin
/// may read `gzip;q=` as accepting gzip. Such an item is compared as it was sent (in lower
/// case), never merged with `gzip;q=0` or the empty field (identity only). Before, any weight
/// of zeros and dots was read as q=0: the variant an origin answered to `gzip;q=` (gzip, say)
/// was served to clients that accept no coding.
#[test]
fn rfc9111_4_1_an_invalid_accept_encoding_weight_is_not_read_as_a_refusal() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: accept-encoding\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let ae = |v: &str| get_h(gw.addr, "/e", &format!("Accept-Encoding: {v}\r\n"));
    miss(&ae("gzip;q="), "v1");
    miss(&ae(""), "v2");
    hit(&ae("gzip;q=0"), "v2");
    hit(&ae("GZIP;Q="), "v1");
    miss(&ae("gzip;q=."), "v3");
    miss(&ae("gzip;q=00"), "v4");
    miss(&ae("gzip;q=0.0000"), "v5");
    // Valid weights are still read: `q=0.` is zero, `q=1.` is one.
    hit(&ae("gzip;q=0."), "v2");
    miss(&ae("gzip"), "v6");
    hit(&ae("gzip;q=1."), "v6");
    assert_eq!(up.hits(), 6);
}

/// An origin for §4.3.4 tests: the first answer is `first` (stored, stale at once), a
/// conditional request gets a 304 carrying `etag_304` and `max-age=60`, any other request
/// the new response (`new`, ETag `etag_304`).
fn validating_origin(first: &'static str, etag_304: &'static str) -> (Upstream, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        match (i, req.header("if-none-match")) {
            (0, _) => Reply::Raw(first.as_bytes().to_vec()),
            (_, Some(_)) => Reply::Raw(
                format!(
                    "HTTP/1.1 304 Not Modified\r\netag: {etag_304}\r\ncache-control: max-age=60\r\n\r\n"
                )
                .into_bytes(),
            ),
            (_, None) => Reply::Raw(
                format!(
                    "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: {etag_304}\r\ncontent-length: 3\r\n\r\nnew"
                )
                .into_bytes(),
            ),
        }
    });
    (up, n)
}

/// RFC 9111 §4.3.4: a 304 whose weak validator does not match the stored response's (weak
/// comparison, RFC 9110 §8.8.3.2) selects nothing for update: the stored response is not
/// freshened and served under another entity tag; it is fetched again whole.
#[test]
fn rfc9111_4_3_4_a_304_with_another_weak_etag_updates_nothing() {
    let (up, n) = validating_origin(
        "HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: W/\"a\"\r\ncontent-length: 3\r\n\r\nold",
        "W/\"b\"",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/w").text(), "old");
    let r = get(gw.addr, "/w");
    assert_eq!((r.status, r.text().as_str()), (200, "new"), "{r:?}");
    assert_eq!(r.header("etag"), Some("W/\"b\""), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 3);
    assert_eq!(get(gw.addr, "/w").text(), "new");
    assert_eq!(n.load(Ordering::SeqCst), 3);
    // A 304 whose weak validator matches still freshens (the weak comparison ignores W/).
    let (up, n) = validating_origin(
        "HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"c\"\r\ncontent-length: 3\r\n\r\nold",
        "W/\"c\"",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/w").text(), "old");
    let r = get(gw.addr, "/w");
    assert_eq!(r.text(), "old", "{r:?}");
    assert!(status_of(&r).contains("fwd=stale"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// RFC 9111 §4.3.4 holds for the background revalidation of `stale-while-revalidate` (RFC
/// 5861 §3) too: a 304 with another strong validator does not freshen the stored response
/// (before, it did, and the old body was then served fresh under the new entity tag); the
/// stale copy is dropped and the next request fetches the new one.
#[test]
fn rfc9111_4_3_4_background_revalidation_does_not_freshen_on_another_etag() {
    let (up, n) = validating_origin(
        "HTTP/1.1 200 OK\r\ncache-control: max-age=0, stale-while-revalidate=60\r\netag: \"a\"\r\ncontent-length: 3\r\n\r\nold",
        "\"b\"",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/bg").text(), "old");
    // Stale: answered at once, revalidated in the background.
    let r = get(gw.addr, "/bg");
    assert_eq!(r.text(), "old");
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 2));
    // Once the 304 is handled, requests get the new response (never the old body as fresh).
    let mut seen = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            let r = get(gw.addr, "/bg");
            seen.push((r.text(), status_of(&r)));
            r.text() == "new"
        }),
        "{} answers, the last: {:?}",
        seen.len(),
        seen.last()
    );
    assert!(
        seen.iter().all(|(t, s)| t == "new" || s.contains("stale")),
        "{seen:?}"
    );
    assert!(n.load(Ordering::SeqCst) >= 3);
}

/// One keep-alive connection on each of a 2-worker gateway's workers (the kernel spreads
/// connections; a miss on `/who/N`, which the origin must answer `no-store`, shows which
/// worker served it).
fn client_per_worker(gw: &TestGateway) -> (Client, Client) {
    let control = gw.gateway().control();
    let misses = || -> Vec<u64> {
        ringway::cache::stats(control, Duration::from_secs(2))
            .unwrap()
            .iter()
            .map(|s| s.misses)
            .collect()
    };
    let mut on: [Option<Client>; 2] = [None, None];
    for i in 0..64 {
        if on.iter().all(Option::is_some) {
            break;
        }
        let before = misses();
        let mut c = Client::connect(gw.addr);
        c.send(format!("GET /who/{i} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes());
        assert_eq!(c.read_response().expect("answer").status, 200);
        let after = misses();
        let w = (0..2)
            .find(|&w| after[w] > before[w])
            .expect("a worker counted it");
        if on[w].is_none() {
            on[w] = Some(c);
        }
    }
    let [Some(x), Some(y)] = on else {
        panic!("the kernel put 64 connections on one worker");
    };
    (x, y)
}

/// RFC 9111 §4.3.5 and §4.3.4 across workers: a HEAD answer whose validator is not the stored
/// one's, and a 304 that selects nothing, invalidate the stored response on every worker, not
/// only on the one that got them (the invalidation path of unsafe methods, §4.4).
#[test]
fn rfc9111_4_3_5_and_4_3_4_invalidation_by_head_or_304_reaches_every_worker() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        if req.target.starts_with("/who/") {
            return Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 1\r\n\r\nw"
                    .to_vec(),
            );
        }
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        if req.method == "HEAD" {
            return Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\netag: \"b\"\r\ncontent-length: 2\r\n\r\n".to_vec(),
            );
        }
        if req.header("if-none-match").is_some() {
            return Reply::Raw(
                b"HTTP/1.1 304 Not Modified\r\ncache-control: max-age=600\r\netag: \"b\"\r\n\r\n"
                    .to_vec(),
            );
        }
        // /h is fresh for 600 s, /v stale at once (validated on its next use).
        let cc = if req.target == "/h" {
            "max-age=600"
        } else {
            "max-age=0"
        };
        Reply::Raw(
            format!("HTTP/1.1 200 OK\r\ncache-control: {cc}\r\netag: \"a\"\r\ncontent-length: 2\r\n\r\nv{}", i % 10)
                .into_bytes(),
        )
    });
    let toml = format!("[server]\nworkers = 2\n{}", cache_config(up.addr, "", ""));
    for d in DRIVERS {
        let gw = TestGateway::start(&toml, d);
        let (mut x, mut y) = client_per_worker(&gw);
        let control = gw.gateway().control();
        let ask = |c: &mut Client, m: &str, path: &str| {
            // A HEAD with `no-cache` goes to the origin even with a fresh GET stored.
            let extra = if m == "HEAD" {
                "cache-control: no-cache\r\n"
            } else {
                ""
            };
            c.send(format!("{m} {path} HTTP/1.1\r\nHost: test.local\r\n{extra}\r\n").as_bytes());
            let r = c.read_response_for(m == "HEAD").expect("answer");
            assert_eq!(r.status, 200, "{d:?}: {r:?}");
            // Jobs run in the order they were posted: once every worker answers this, the
            // invalidations posted before have run.
            ringway::cache::stats(control, Duration::from_secs(2)).unwrap();
            r
        };
        // HEAD (§4.3.5): both workers store /h; a HEAD through x says the validator changed.
        ask(&mut x, "GET", "/h");
        ask(&mut y, "GET", "/h");
        assert!(status_of(&ask(&mut y, "GET", "/h")).contains("hit"));
        ask(&mut x, "HEAD", "/h");
        let r = ask(&mut y, "GET", "/h");
        assert!(
            !status_of(&r).contains("hit"),
            "{d:?}: y kept what the HEAD invalidated: {r:?}"
        );
        // 304 (§4.3.4): both workers store /v (stale); x validates it and the 304 names
        // another strong validator: y's copy goes too, so y fetches whole (no validator).
        ask(&mut x, "GET", "/v");
        ask(&mut y, "GET", "/v");
        ask(&mut x, "GET", "/v");
        assert!(
            up.last().header("if-none-match").is_none(),
            "x refetched whole"
        );
        ask(&mut y, "GET", "/v");
        assert!(
            up.last().header("if-none-match").is_none(),
            "{d:?}: y validated the copy the 304 invalidated: {:?}",
            up.last()
        );
    }
}

/// RFC 9111 §4.3.5 with `[cache.redis]`: a HEAD answer that invalidates the stored GET
/// deletes the Redis copy too, so another gateway does not find the invalidated response.
#[test]
fn rfc9111_4_3_5_invalidation_by_head_reaches_redis() {
    let redis = RedisServer::start();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let (etag, body) = if req.method == "HEAD" {
            ("\"b\"", String::new())
        } else {
            ("\"a\"", format!("v{i}"))
        };
        Reply::Raw(
            format!("HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\netag: {etag}\r\ncontent-length: 2\r\n\r\n{body}")
                .into_bytes(),
        )
    });
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    assert_eq!(get(a.addr, "/h").text(), "v1");
    wait_stored_in_redis(&redis);
    let h = request(
        a.addr,
        b"HEAD /h HTTP/1.1\r\nHost: test.local\r\ncache-control: no-cache\r\n\r\n",
    );
    assert_eq!(h.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || redis
            .keys("ringway:cache:o:*")
            .is_empty()),
        "the Redis copy outlived the HEAD that invalidated it"
    );
    let r = get(b.addr, "/h");
    assert_eq!(r.text(), "v3", "{r:?}");
}

/// An origin whose answers vary on `Accept-Language` (the language is the body), stale on
/// arrival, all with the strong entity tag "s", and which answers a validation of "s" with a
/// 304 fresh for 600 s; with the count of the requests it got.
fn strong_tag_origin() -> (Upstream, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        n2.fetch_add(1, Ordering::SeqCst);
        if req.header("if-none-match") == Some("\"s\"") {
            return Reply::Raw(
                b"HTTP/1.1 304 Not Modified\r\ncache-control: max-age=600\r\netag: \"s\"\r\n\r\n"
                    .to_vec(),
            );
        }
        let lang = req.header("accept-language").unwrap_or("none").to_string();
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"s\"\r\nvary: accept-language\r\ncontent-length: {}\r\n\r\n{lang}",
                lang.len()
            )
            .into_bytes(),
        )
    });
    (up, n)
}

/// RFC 9111 §4.3.4: "all the stored responses with the same strong validator are selected":
/// a 304 that validates one variant freshens every variant stored with that strong entity tag.
#[test]
fn rfc9111_4_3_4_a_304_freshens_every_variant_with_the_same_strong_validator() {
    let (up, n) = strong_tag_origin();
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let lang = |l: &str| get_h(gw.addr, "/m", &format!("accept-language: {l}\r\n"));
    assert_eq!(lang("en").text(), "en");
    assert_eq!(lang("fr").text(), "fr");
    // Both stored, stale. Validating "en" gets a 304 with the strong tag both carry.
    let r = lang("en");
    assert!(status_of(&r).contains("fwd-status=304"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 3);
    // "fr" was selected by the same 304: fresh now, answered without the origin.
    let r = lang("fr");
    assert_eq!(r.text(), "fr");
    assert!(status_of(&r).contains("hit"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

/// RFC 9111 §4.1 with `[cache.redis]`: every variant of a key reaches Redis (not only the one
/// written last), so another gateway finds each of them; at most `cache.max_variants` are kept
/// there, the oldest deleted first.
#[test]
fn rfc9111_4_1_redis_keeps_every_variant_up_to_the_cap() {
    let redis = RedisServer::start();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        n2.fetch_add(1, Ordering::SeqCst);
        let body = req
            .header("accept-encoding")
            .unwrap_or("identity")
            .to_string();
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\nvary: Accept-Encoding\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let toml = redis_cache_config(up.addr, &redis)
        .replace("[cache.redis]", "[cache]\nmax_variants = 2\n[cache.redis]");
    let in_redis = |pattern: &str| {
        redis
            .command(&["EVAL", "return #redis.call('KEYS', ARGV[1])", "0", pattern])
            .unwrap_or_default()
    };
    let variants_in_redis = || in_redis("ringway:cache:w:*");
    let a = TestGateway::start(&toml, D);
    let b = TestGateway::start(&toml, D);
    let enc = |gw: &TestGateway, e: &str| {
        let h = if e.is_empty() {
            String::new()
        } else {
            format!("accept-encoding: {e}\r\n")
        };
        get_h(gw.addr, "/z", &h)
    };
    assert_eq!(enc(&a, "gzip").text(), "gzip");
    assert_eq!(enc(&a, "").text(), "identity");
    // Both written (queued writes; bounded wait, checked below by what another gateway finds).
    eventually(Duration::from_secs(5), || variants_in_redis() == ":2\r\n");
    // The gzip variant was written first, then the identity one: both are found.
    for (e, want) in [("gzip", "gzip"), ("", "identity")] {
        let r = enc(&b, e);
        assert_eq!(r.text(), want, "{r:?}");
        assert!(status_of(&r).contains("detail=redis"), "{e:?}: {r:?}");
    }
    assert_eq!(n.load(Ordering::SeqCst), 2);
    // A third variant: the oldest (gzip) leaves Redis, the cap being 2.
    assert_eq!(enc(&a, "br").text(), "br");
    assert!(eventually(Duration::from_secs(5), || {
        in_redis("ringway:cache:w:*br*") == ":1\r\n"
    }));
    assert_eq!(variants_in_redis(), ":2\r\n");
    let c = TestGateway::start(&toml, D);
    let r = enc(&c, "");
    assert!(status_of(&r).contains("detail=redis"), "{r:?}");
    let before = n.load(Ordering::SeqCst);
    let r = enc(&c, "gzip");
    assert!(!status_of(&r).contains("detail=redis"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), before + 1);
    // RFC 9211 §2.2: a gateway that holds nothing of the key, asked for a variant Redis does
    // not hold while Redis holds others, says `vary-miss`, not `uri-miss` (before, it said
    // `uri-miss`: only the worker's own store was looked at for other variants).
    let d = TestGateway::start(&toml, D);
    let r = enc(&d, "deflate");
    assert_eq!(r.text(), "deflate");
    assert!(status_of(&r).contains("fwd=vary-miss"), "{r:?}");
    // A key Redis does not hold at all is still a `uri-miss`.
    let r = get_h(d.addr, "/none-such", "accept-encoding: deflate\r\n");
    assert!(status_of(&r).contains("fwd=uri-miss"), "{r:?}");
}

/// RFC 9111 §4.3.4 with `[cache.redis]`: "all the stored responses with the same strong
/// validator are selected" covers the variants only Redis holds. Gateway a stores two
/// variants; gateway b, holding neither, validates one of them from Redis and gets a 304 whose
/// strong tag the other carries: that other one is freshened in Redis too, so a third gateway
/// (and a, whose own copy is stale) take it fresh from Redis without asking the origin.
#[test]
fn rfc9111_4_3_4_a_304_freshens_the_selected_variants_only_redis_holds() {
    let redis = RedisServer::start();
    let (up, n) = strong_tag_origin();
    let toml = redis_cache_config(up.addr, &redis);
    // The expiry Redis gives the one variant whose name holds `lang` (-3: not exactly one).
    let ttl_of = |lang: &str| {
        redis
            .command(&[
                "EVAL",
                "local ks = redis.call('KEYS', ARGV[1]) if #ks ~= 1 then return -3 end return redis.call('TTL', ks[1])",
                "0",
                &format!("ringway:cache:w:*{lang}*"),
            ])
            .and_then(|r| r.trim().strip_prefix(':')?.parse::<i64>().ok())
            .unwrap_or(-3)
    };
    let lang =
        |gw: &TestGateway, l: &str| get_h(gw.addr, "/m", &format!("accept-language: {l}\r\n"));
    let a = TestGateway::start(&toml, D);
    assert_eq!(lang(&a, "en").text(), "en");
    assert_eq!(lang(&a, "fr").text(), "fr");
    assert!(eventually(Duration::from_secs(5), || ttl_of("en") > 0
        && ttl_of("fr") > 0));
    // Stale on arrival (max-age=0): kept for the validation slack only.
    assert!(ttl_of("fr") <= 60, "{}", ttl_of("fr"));
    let b = TestGateway::start(&toml, D);
    let r = lang(&b, "en");
    assert_eq!(r.text(), "en");
    assert!(status_of(&r).contains("fwd-status=304"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 3);
    // "fr" in Redis is freshened by that 304 (written in the background).
    assert!(
        eventually(Duration::from_secs(5), || ttl_of("fr") > 600),
        "fr's expiry in Redis: {}",
        ttl_of("fr")
    );
    let c = TestGateway::start(&toml, D);
    for gw in [&c, &a] {
        let r = lang(gw, "fr");
        assert_eq!(r.text(), "fr");
        let st = status_of(&r);
        assert!(st.contains("hit") && st.contains("detail=redis"), "{r:?}");
    }
    assert_eq!(
        n.load(Ordering::SeqCst),
        3,
        "the origin was asked about fr again"
    );
}

/// RFC 9111 §4.3.4 across workers: the variants a 304 with a strong entity tag selects are
/// freshened on every worker, also those the validating worker does not hold.
#[test]
fn rfc9111_4_3_4_a_304_freshens_the_variants_with_its_strong_validator_on_every_worker() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        if req.target.starts_with("/who/") {
            return Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 1\r\n\r\nw"
                    .to_vec(),
            );
        }
        n2.fetch_add(1, Ordering::SeqCst);
        if req.header("if-none-match") == Some("\"s\"") {
            return Reply::Raw(
                b"HTTP/1.1 304 Not Modified\r\ncache-control: max-age=600\r\netag: \"s\"\r\n\r\n"
                    .to_vec(),
            );
        }
        let lang = req.header("accept-language").unwrap_or("none").to_string();
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"s\"\r\nvary: accept-language\r\ncontent-length: {}\r\n\r\n{lang}",
                lang.len()
            )
            .into_bytes(),
        )
    });
    let toml = format!("[server]\nworkers = 2\n{}", cache_config(up.addr, "", ""));
    for d in DRIVERS {
        n.store(0, Ordering::SeqCst);
        let gw = TestGateway::start(&toml, d);
        let (mut x, mut y) = client_per_worker(&gw);
        let control = gw.gateway().control();
        let lang = |c: &mut Client, l: &str| {
            c.send(
                format!("GET /m HTTP/1.1\r\nHost: test.local\r\naccept-language: {l}\r\n\r\n")
                    .as_bytes(),
            );
            let r = c.read_response().expect("answer");
            assert_eq!((r.status, r.text().as_str()), (200, l), "{d:?}: {r:?}");
            // Jobs run in the order they were posted: once every worker answers this, the
            // freshenings posted before have run.
            ringway::cache::stats(control, Duration::from_secs(2)).unwrap();
            r
        };
        // x stores "en"; y stores "en" and "fr"; all stale at once.
        lang(&mut x, "en");
        lang(&mut y, "en");
        lang(&mut y, "fr");
        assert_eq!(n.load(Ordering::SeqCst), 3);
        // x validates "en": the 304's strong tag is "fr"'s too, which only y holds.
        let r = lang(&mut x, "en");
        assert!(status_of(&r).contains("fwd-status=304"), "{d:?}: {r:?}");
        assert_eq!(n.load(Ordering::SeqCst), 4);
        let r = lang(&mut y, "fr");
        assert!(status_of(&r).contains("hit"), "{d:?}: {r:?}");
        assert_eq!(
            n.load(Ordering::SeqCst),
            4,
            "{d:?}: y validated \"fr\" again"
        );
        assert!(status_of(&lang(&mut y, "en")).contains("hit"));
    }
}

/// RFC 9111 §4.3.5 and §4 with `[cache.redis]`: a HEAD on a gateway that does not hold the
/// stored GET uses the one in Redis. While it is fresh the HEAD is answered from it without
/// the origin; once it is stale the HEAD goes to the origin, and a 200 that agrees with it
/// freshens it for every gateway sharing the Redis.
#[test]
fn rfc9111_4_3_5_a_head_uses_and_freshens_the_get_stored_in_redis() {
    let redis = RedisServer::start();
    let gets = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(AtomicUsize::new(0));
    let (g2, h2) = (gets.clone(), heads.clone());
    let up = Upstream::start(move |req| {
        if req.method == "HEAD" {
            h2.fetch_add(1, Ordering::SeqCst);
            return Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\netag: \"a\"\r\ncontent-length: 2\r\n\r\n"
                    .to_vec(),
            );
        }
        let i = g2.fetch_add(1, Ordering::SeqCst) + 1;
        // Under /stale/ stored already stale (max-age=0), so that a HEAD validates it.
        let age = if req.target.starts_with("/stale/") {
            0
        } else {
            600
        };
        Reply::Raw(
            format!("HTTP/1.1 200 OK\r\ncache-control: max-age={age}\r\netag: \"a\"\r\ncontent-length: 2\r\n\r\nv{i}")
                .into_bytes(),
        )
    });
    let a = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let b = TestGateway::start(&redis_cache_config(up.addr, &redis), D);
    let head = |addr, path: &str| {
        request(
            addr,
            format!("HEAD {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes(),
        )
    };

    // Fresh in Redis: b answers the HEAD from a's entry.
    assert_eq!(get(a.addr, "/fresh/x").text(), "v1");
    assert!(eventually(Duration::from_secs(5), || redis.calls("set") >= 1));
    let h = head(b.addr, "/fresh/x");
    assert_eq!(h.status, 200);
    assert!(status_of(&h).contains("hit"), "{h:?}");
    assert_eq!(h.header("etag"), Some("\"a\""));
    assert_eq!(
        heads.load(Ordering::SeqCst),
        0,
        "the HEAD reached the origin"
    );
    assert_eq!(gets.load(Ordering::SeqCst), 1);

    // Stale in Redis: the HEAD goes to the origin as a HEAD, and its 200 (same tag, same
    // length, max-age=600) freshens the stored GET.
    assert_eq!(get(a.addr, "/stale/y").text(), "v2");
    assert!(eventually(Duration::from_secs(5), || redis.calls("set") >= 2));
    let h = head(b.addr, "/stale/y");
    assert_eq!(h.status, 200);
    assert!(status_of(&h).contains("fwd=stale"), "{h:?}");
    assert_eq!(heads.load(Ordering::SeqCst), 1);
    // b answers the GET from its freshened copy, without the origin.
    let r = get(b.addr, "/stale/y");
    assert_eq!(r.text(), "v2");
    assert!(status_of(&r).contains("hit"), "{r:?}");
    // So does a, whose own copy is stale, once the freshened entry is in Redis.
    assert!(eventually(Duration::from_secs(5), || redis.calls("set") >= 3));
    let r = get(a.addr, "/stale/y");
    assert_eq!(r.text(), "v2");
    assert!(status_of(&r).contains("hit"), "{r:?}");
    assert_eq!(
        gets.load(Ordering::SeqCst),
        2,
        "a GET reached the origin again"
    );
}

/// The raw head of the answer to `GET path` (read up to its blank line; the body is left).
fn raw_head(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut buf).expect("an answer");
        assert!(k > 0, "{got:?}");
        got.extend_from_slice(&buf[..k]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A hit writes the stored lines in the order received, each as `name: value` CRLF: the
/// lines already in that form are copied as they stand from the stored head, the others
/// (no space or more whitespace after the colon, spaces before the line end) written anew;
/// lines never stored (framing) and those the route removes are left out between them, and
/// the Date the cache added to a response without one comes after them (RFC 9110 §6.6.1).
#[test]
fn a_hit_writes_the_stored_lines_in_order_in_one_form() {
    for d in DRIVERS {
        let (up, _) = counting_origin(
            "X-One: a\r\nX-Two:b\r\nServer: s\r\nX-Three:  c \r\nX-Four: d\r\n\
             cache-control: max-age=60\r\nX-Five: e\r\n",
        );
        let toml = config(
            &[up.addr],
            "[[routes]]\nupstream = \"up\"\ncache = { }\n\
             response_headers = { remove = [\"server\"] }\n",
        );
        let gw = TestGateway::start(&toml, d);
        let miss = raw_head(gw.addr, "/lines");
        assert!(miss.contains("stored"), "{miss}");
        let hit = raw_head(gw.addr, "/lines");
        assert!(hit.contains("; hit"), "{d:?}: {hit}");
        let want = "HTTP/1.1 200 OK\r\nX-One: a\r\nX-Two: b\r\nX-Three: c\r\nX-Four: d\r\n\
                    cache-control: max-age=60\r\nX-Five: e\r\ndate: ";
        assert!(hit.starts_with(want), "{d:?}: {hit}");
        assert!(
            !hit.to_ascii_lowercase().contains("server:"),
            "{d:?}: {hit}"
        );
        assert_eq!(up.hits(), 1);
    }
}

/// Reads a raw response to its end (the request asked for `connection: close`): its head and
/// its body, de-chunked. `None` when it ends before its body does (for a chunked body: no
/// last chunk), so a cut answer cannot pass for a whole one.
fn read_whole_response(s: &mut std::net::TcpStream, mut got: Vec<u8>) -> Option<(String, Vec<u8>)> {
    use std::io::Read;
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let rest = &got[end..];
    if !head.contains("transfer-encoding: chunked") {
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))?
            .trim()
            .parse()
            .ok()?;
        return (rest.len() == len).then(|| (head, rest.to_vec()));
    }
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + rest[at..].windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[at..line_end]).ok()?, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            return rest[at..].starts_with(b"\r\n").then_some((head, body));
        }
        body.extend_from_slice(rest.get(at..at + size)?);
        at += size + 2;
    }
}

/// A response of `first` bytes '@' and then `rest` bytes '#' (as one piece of length `len`, or
/// chunked in 16 KiB chunks): the first piece with the head, the rest once `go` is set.
fn two_part_origin(first: usize, rest: usize, chunked: bool, go: Arc<Event>) -> Upstream {
    Upstream::start(move |_| {
        let chunk = |n: usize, b: u8| {
            let mut v = format!("{n:x}\r\n").into_bytes();
            v.extend(std::iter::repeat_n(b, n));
            v.extend_from_slice(b"\r\n");
            v
        };
        let (mut head, tail) = if chunked {
            let mut tail = Vec::new();
            let mut left = rest;
            while left > 0 {
                let n = left.min(16 * 1024);
                tail.extend(chunk(n, b'#'));
                left -= n;
            }
            tail.extend_from_slice(b"0\r\n\r\n");
            (
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ntransfer-encoding: chunked\r\n\r\n"
                    .to_vec(),
                tail,
            )
        } else {
            (
                format!(
                    "HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: {}\r\n\r\n",
                    first + rest
                )
                .into_bytes(),
                vec![b'#'; rest],
            )
        };
        if chunked {
            head.extend(chunk(first, b'@'));
        } else {
            head.extend(std::iter::repeat_n(b'@', first));
        }
        Reply::Script(vec![
            Step::Write(head),
            Step::Await(go.clone()),
            Step::Write(tail),
        ])
    })
}

/// Sends a coalesced request (the fetch for `path` has begun) and reads until the first
/// piece of the body (`first` bytes '@') arrived through the flight; returns the connection
/// and what it read.
fn join_fetch(addr: SocketAddr, path: &str, first: usize) -> (std::net::TcpStream, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test.local\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.iter().filter(|b| **b == b'@').count() < first {
        let n = s.read(&mut buf).expect("the first piece");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    (s, got)
}

/// RFC 9111 §3 / RFC 9112 §6.3: the client whose request leads a coalesced fetch goes away
/// mid-body; the waiter still gets the whole response (the body is read on for it and for the
/// store), the response is stored, and the next request is a hit (one origin fetch).
#[test]
fn rfc9111_3_a_leader_that_goes_away_mid_body_cuts_no_waiter_and_the_response_is_stored() {
    for d in DRIVERS {
        for chunked in [false, true] {
            let (first, rest) = (1000, 300 * 1024);
            let go = Event::new();
            let up = two_part_origin(first, rest, chunked, go.clone());
            let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
            let mut leader = Client::connect(gw.addr);
            leader.send(b"GET /leave HTTP/1.1\r\nHost: test.local\r\n\r\n");
            assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 1));
            let (mut waiter, got) = join_fetch(gw.addr, "/leave", first);
            // The leader leaves with the head and first piece unread (a reset, so the
            // gateway's next write to it fails), then the origin sends the rest.
            drop(leader);
            go.set();
            let (head, body) = read_whole_response(&mut waiter, got)
                .unwrap_or_else(|| panic!("{d:?} chunked={chunked}: the waiter's answer was cut"));
            assert!(head.contains("collapsed"), "{head}");
            assert_eq!(body.len(), first + rest, "{d:?} chunked={chunked}");
            assert!(body[..first].iter().all(|b| *b == b'@'));
            assert!(body[first..].iter().all(|b| *b == b'#'));
            let r = get(gw.addr, "/leave");
            assert_eq!(r.body.len(), first + rest);
            assert!(
                status_of(&r).contains("hit"),
                "{d:?} chunked={chunked}: {r:?}"
            );
            assert_eq!(up.hits(), 1, "{d:?} chunked={chunked}");
        }
    }
}

/// RFC 9111 §3 / RFC 9112 §7.1: a chunked body that outgrows `max_object_bytes` is not
/// stored, but a waiter already streaming it still gets all of it and its last chunk (the
/// origin sends each 8 KiB piece once the waiter has the one before: within the 16 KiB
/// window); also when the leader's client goes away on the way. The next request goes to the
/// origin again.
#[test]
fn rfc9111_3_a_chunked_body_past_max_object_bytes_still_reaches_its_waiters_whole() {
    use std::io::Read;
    for d in DRIVERS {
        for leader_leaves in [false, true] {
            const FIRST: usize = 1000;
            const PIECE: usize = 8 * 1024;
            const PIECES: usize = 5;
            let evs: Vec<Arc<Event>> = (0..PIECES).map(|_| Event::new()).collect();
            let evs2 = evs.clone();
            let up = Upstream::start(move |_| {
                let chunk = |n: usize, b: u8| {
                    let mut v = format!("{n:x}\r\n").into_bytes();
                    v.extend(std::iter::repeat_n(b, n));
                    v.extend_from_slice(b"\r\n");
                    v
                };
                let mut head = b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\n\
                    transfer-encoding: chunked\r\n\r\n"
                    .to_vec();
                head.extend(chunk(FIRST, b'@'));
                let mut steps = vec![Step::Write(head)];
                for ev in &evs2 {
                    steps.push(Step::Await(ev.clone()));
                    steps.push(Step::Write(chunk(PIECE, b'#')));
                }
                steps.push(Step::Write(b"0\r\n\r\n".to_vec()));
                Reply::Script(steps)
            });
            let gw = TestGateway::start(
                &cache_config(up.addr, "max_object_bytes = \"16KiB\"", ""),
                d,
            );
            let mut leader = Client::connect(gw.addr);
            leader.send(b"GET /past HTTP/1.1\r\nHost: test.local\r\n\r\n");
            assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 1));
            let (mut waiter, mut got) = join_fetch(gw.addr, "/past", FIRST);
            let leader = if leader_leaves {
                drop(leader);
                None
            } else {
                Some(leader)
            };
            let mut buf = [0u8; 65536];
            for (i, ev) in evs.iter().enumerate() {
                while got.iter().filter(|b| **b == b'#').count() < i * PIECE {
                    let n = waiter.read(&mut buf).expect("the next piece");
                    assert!(
                        n > 0,
                        "{d:?} leaves={leader_leaves}: cut after {} bytes",
                        got.len()
                    );
                    got.extend_from_slice(&buf[..n]);
                }
                ev.set();
            }
            let (head, body) = read_whole_response(&mut waiter, got).unwrap_or_else(|| {
                panic!("{d:?} leaves={leader_leaves}: the waiter's answer was cut")
            });
            assert!(head.contains("collapsed"), "{head}");
            assert_eq!(body.len(), FIRST + PIECES * PIECE);
            assert!(body[FIRST..].iter().all(|b| *b == b'#'));
            if let Some(mut l) = leader {
                assert_eq!(
                    l.read_response().unwrap().body.len(),
                    FIRST + PIECES * PIECE
                );
            }
            assert_eq!(up.hits(), 1);
            let r = get(gw.addr, "/past");
            assert_eq!(r.body.len(), FIRST + PIECES * PIECE);
            assert_eq!(up.hits(), 2, "{d:?} leaves={leader_leaves}: not stored");
        }
    }
}

/// Reads from `s` into `got` (what came before on it) until what follows the response head
/// satisfies `done`; returns the head.
fn read_head_until(
    (s, got): &mut (std::net::TcpStream, Vec<u8>),
    done: impl Fn(&[u8]) -> bool,
) -> String {
    use std::io::Read;
    let mut tmp = [0u8; 16384];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if done(&got[end + 4..]) {
                return String::from_utf8_lossy(&got[..end]).into_owned();
            }
        }
        let n = s
            .read(&mut tmp)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(got)));
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(got));
        got.extend_from_slice(&tmp[..n]);
    }
}

/// Bodies that arrive after their head are captured for the store as they arrive, outside
/// the store's budget until stored: `[cache] max_in_flight_bytes_per_worker` bounds what one
/// worker holds so (a flood of concurrent misses for large bodies cannot exhaust memory). A
/// body whose declared length does not fit is not captured (`detail=in-flight-full`); a
/// chunked one that outgrows the room left is dropped on the way. Both still reach their
/// clients whole, and neither is stored; what a capture held is given back when it ends.
#[test]
fn bodies_being_captured_are_bounded_by_the_worker_s_in_flight_bytes() {
    use std::io::Write;
    let ev: Vec<Arc<Event>> = (0..4).map(|_| Event::new()).collect();
    let evs = ev.clone();
    let kib = |c: u8| vec![c; 1024];
    let up = Upstream::start(move |req| {
        let mut head = b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n".to_vec();
        let chunk = |n: usize, c: u8| {
            let mut v = format!("{:x}\r\n", n * 1024).into_bytes();
            (0..n).for_each(|_| v.extend_from_slice(&kib(c)));
            v.extend_from_slice(b"\r\n");
            v
        };
        match req.target.as_str() {
            // Declared lengths: 3 KiB, the first KiB at once, the rest when released.
            p @ ("/len-a" | "/len-b") => {
                head.extend_from_slice(b"content-length: 3072\r\n\r\n");
                head.extend_from_slice(&kib(b'a'));
                Reply::Script(vec![
                    Step::Write(head),
                    Step::Await(evs[usize::from(p == "/len-b")].clone()),
                    Step::Write([kib(b'a'), kib(b'a')].concat()),
                ])
            }
            // Chunked: /ch-a sends 3 KiB and waits; /ch-b sends 1 KiB (4 KiB held in all),
            // then 1 KiB more, past the bound.
            "/ch-a" => {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                head.extend_from_slice(&chunk(3, b'c'));
                Reply::Script(vec![
                    Step::Write(head),
                    Step::Await(evs[2].clone()),
                    Step::Write(b"0\r\n\r\n".to_vec()),
                ])
            }
            "/ch-b" => {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                head.extend_from_slice(&chunk(1, b'd'));
                Reply::Script(vec![
                    Step::Write(head),
                    Step::Await(evs[3].clone()),
                    Step::Write([chunk(1, b'd'), b"0\r\n\r\n".to_vec()].concat()),
                ])
            }
            _ => Reply::Raw(ok_response(b"?")),
        }
    });
    let gw = TestGateway::start(
        &format!(
            "[server]\nworkers = 1\n{}",
            cache_config(
                up.addr,
                "",
                "[cache]\nmax_object_bytes = \"4KiB\"\nmax_in_flight_bytes_per_worker = \"4KiB\"",
            )
        ),
        D,
    );
    let open = |path: &str| {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes())
            .unwrap();
        (s, Vec::new())
    };
    let hits_of = |path: &str| up.targets().iter().filter(|t| *t == path).count();
    // (Counted in data bytes, which the relayed framing only adds to.)
    let at_least = |n: usize| move |b: &[u8]| b.len() >= n;
    let last_chunk = |b: &[u8]| b.ends_with(b"0\r\n\r\n");

    // /len-a holds 3 KiB; /len-b's 3 KiB do not fit beside it.
    let mut a = open("/len-a");
    let head = read_head_until(&mut a, at_least(1024));
    // Captured, its store decided once it is whole (RFC 9211 §2.5).
    assert!(head.contains("detail=streamed"), "{head}");
    let mut b = open("/len-b");
    let head = read_head_until(&mut b, at_least(1024));
    assert!(head.contains("detail=in-flight-full"), "{head}");
    ev[1].set();
    read_head_until(&mut b, at_least(3072));
    ev[0].set();
    read_head_until(&mut a, at_least(3072));
    let r = get(gw.addr, "/len-a");
    assert!(status_of(&r).contains("hit"), "stored: {r:?}");
    assert_eq!(r.body.len(), 3072);
    let r = get(gw.addr, "/len-b");
    assert!(!status_of(&r).contains("hit"), "not stored: {r:?}");
    assert_eq!(r.body.len(), 3072);
    assert_eq!((hits_of("/len-a"), hits_of("/len-b")), (1, 2));

    // What those captures held was given back: /ch-a takes 3 KiB of the 4, /ch-b 1 KiB, and
    // its next KiB does not fit.
    let mut a = open("/ch-a");
    let head = read_head_until(&mut a, at_least(3072));
    assert!(head.contains("detail=streamed"), "{head}");
    let mut b = open("/ch-b");
    read_head_until(&mut b, at_least(1024));
    ev[3].set();
    read_head_until(&mut b, last_chunk);
    ev[2].set();
    read_head_until(&mut a, last_chunk);
    let r = get(gw.addr, "/ch-a");
    assert!(status_of(&r).contains("hit"), "stored: {r:?}");
    assert_eq!(r.body, vec![b'c'; 3072]);
    let r = get(gw.addr, "/ch-b");
    assert!(!status_of(&r).contains("hit"), "not stored: {r:?}");
    assert_eq!(r.body, vec![b'd'; 2048]);
    assert_eq!((hits_of("/ch-a"), hits_of("/ch-b")), (1, 2));
}

/// The `Cache-Status` lines of a response, in order.
fn status_lines(r: &Resp) -> Vec<String> {
    r.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("cache-status"))
        .map(|(_, v)| v.clone())
        .collect()
}

/// RFC 9211 §2.2 (`fwd`) and §2.7 (`detail`): an answer the gateway makes for a failed
/// upstream on a cache route carries the cache's member, naming the failure, as every other
/// answer of the cache phase does; so do OPTIONS (forwarded for its method) and an unsafe
/// method's failure.
#[test]
fn rfc9211_2_7_gateway_made_failures_on_a_cache_route_carry_cache_status() {
    let refusing = refusing_addr();
    let gw = TestGateway::start(&cache_config(refusing.addr, "", ""), D);
    let r = get(gw.addr, "/f");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=uri-miss; detail=upstream-connect-failed"],
        "{r:?}"
    );
    let r = request(
        gw.addr,
        b"POST /f HTTP/1.1\r\nHost: test.local\r\nContent-Length: 1\r\n\r\nx",
    );
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=method; detail=upstream-connect-failed"],
        "{r:?}"
    );

    let hang = Upstream::start(|_| Reply::Hang(Duration::from_secs(10)));
    let gw = TestGateway::start(
        &cache_config(hang.addr, "", "[timeouts]\nupstream_response = \"300ms\"\n"),
        D,
    );
    let r = get(gw.addr, "/t");
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=uri-miss; detail=upstream-timeout"],
        "{r:?}"
    );

    let long = Upstream::start(|_| {
        let mut head = b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n".to_vec();
        head.extend_from_slice(b"x-long: ");
        head.extend(std::iter::repeat_n(b'a', 200 * 1024));
        head.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
        Reply::Raw(head)
    });
    let gw = TestGateway::start(&cache_config(long.addr, "", ""), D);
    let r = get(gw.addr, "/l");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=uri-miss; detail=upstream-bad-response"],
        "{r:?}"
    );

    let (up, _) = counting_origin("cache-control: max-age=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let r = request(gw.addr, b"OPTIONS /o HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=method; fwd-status=200"],
        "{r:?}"
    );
}

/// RFC 9211 §2.7, RFC 9112 §7.1: a chunked body whose framing is bad before any of the
/// response went to the client gets the gateway's 502, and its member names the failure as
/// for any failed trip upstream (not the miss's, which said what the relay was to be); on
/// each kind of fetch (a GET that may be stored, one that may not, an unsafe method). Once
/// the head went out, the connection is cut: no 502, no last chunk.
#[test]
fn rfc9211_2_7_bad_chunked_framing_before_the_head_names_the_failure() {
    let bad = b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n";
    let up = Upstream::start(move |_| Reply::RawClose(bad.to_vec()));
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    for (req, member) in [
        (
            &b"GET /c HTTP/1.1\r\nHost: test.local\r\n\r\n"[..],
            "ringway; fwd=uri-miss; detail=upstream-bad-response",
        ),
        (
            b"GET /c HTTP/1.1\r\nHost: test.local\r\nX-HTTP-Method-Override: PUT\r\n\r\n",
            "ringway; fwd=bypass; detail=upstream-bad-response",
        ),
        (
            b"DELETE /c HTTP/1.1\r\nHost: test.local\r\n\r\n",
            "ringway; fwd=method; detail=upstream-bad-response",
        ),
    ] {
        let r = request(gw.addr, req);
        assert_eq!(r.status, 502, "{r:?}");
        assert_eq!(status_lines(&r), [member], "{r:?}");
    }

    // The head and a first chunk went out before the bad framing came.
    let go_on = Event::new();
    let go = go_on.clone();
    let up = Upstream::start(move |_| {
        Reply::Script(vec![
            Step::Write(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n"
                    .to_vec(),
            ),
            Step::Await(go.clone()),
            Step::Write(b"zz\r\nok\r\n0\r\n\r\n".to_vec()),
            Step::Close,
        ])
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_all(&mut s, b"GET /h HTTP/1.1\r\nHost: test.local\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(7).any(|w| w == b"2\r\nok\r\n") {
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        assert!(n > 0, "{:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    go_on.set();
    loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    // No second answer (a 502's status line; not "502" anywhere: the random request id may
    // hold those digits) and no last chunk.
    assert!(
        !text.contains("HTTP/1.1 502") && !text.ends_with("0\r\n\r\n"),
        "{text}"
    );
}

/// RFC 9211 §2: a cache preserves the `Cache-Status` members already in a response and adds
/// its own last. The upstream's member is stored with the response and comes before ours on
/// hits, HEAD and 304 answers from the store, and on a validated answer (where the 304's own
/// member replaces the stored one, RFC 9111 §3.2).
#[test]
fn rfc9211_2_an_upstream_cache_status_member_is_kept_before_ours_on_answers_from_the_store() {
    let up = Upstream::start(|req| {
        if req.header("if-none-match").is_some() {
            return Reply::Raw(
                b"HTTP/1.1 304 Not Modified\r\ncache-status: edge; hit\r\netag: \"v\"\r\n\
                  cache-control: max-age=0\r\n\r\n"
                    .to_vec(),
            );
        }
        let cc = if req.target == "/s" {
            "max-age=0"
        } else {
            "max-age=60"
        };
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-status: edge; fwd=uri-miss; stored\r\n\
                 cache-control: {cc}\r\netag: \"v\"\r\ncontent-length: 2\r\n\r\nok"
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let miss = get(gw.addr, "/h");
    assert_eq!(
        status_lines(&miss),
        [
            "edge; fwd=uri-miss; stored",
            "ringway; fwd=uri-miss; fwd-status=200; stored"
        ],
        "{miss:?}"
    );
    let hit = get(gw.addr, "/h");
    let lines = status_lines(&hit);
    assert_eq!(lines.len(), 2, "{hit:?}");
    assert_eq!(lines[0], "edge; fwd=uri-miss; stored", "{hit:?}");
    assert!(lines[1].starts_with("ringway; hit; ttl="), "{hit:?}");
    let head = request(gw.addr, b"HEAD /h HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert_eq!(
        status_lines(&head)[0],
        "edge; fwd=uri-miss; stored",
        "{head:?}"
    );
    let not_modified = get_h(gw.addr, "/h", "If-None-Match: \"v\"\r\n");
    assert_eq!(not_modified.status, 304, "{not_modified:?}");
    let lines = status_lines(&not_modified);
    assert_eq!(lines.len(), 2, "{not_modified:?}");
    assert_eq!(lines[0], "edge; fwd=uri-miss; stored", "{not_modified:?}");
    assert!(lines[1].starts_with("ringway; hit"), "{not_modified:?}");
    assert_eq!(up.hits(), 1);
    // Stored stale: validated, the 304's member replaces the stored one.
    get(gw.addr, "/s");
    let validated = get(gw.addr, "/s");
    let lines = status_lines(&validated);
    assert_eq!(lines.len(), 2, "{validated:?}");
    assert_eq!(lines[0], "edge; hit", "{validated:?}");
    assert!(
        lines[1].starts_with("ringway; fwd=stale; fwd-status=304"),
        "{validated:?}"
    );
}

/// RFC 9211 §2: a member names the cache that wrote it. An upstream's member bearing this
/// cache's name would be kept before ours and forge its status (a `hit` on a miss), so it is
/// dropped, when the response is relayed and when it is stored; the other members stay, and a
/// name in another case or inside a parameter is not this cache's.
#[test]
fn rfc9211_2_an_upstream_member_bearing_this_cache_s_name_is_dropped() {
    let up = Upstream::start(|req| {
        let cc = if req.target == "/n" {
            "no-store"
        } else {
            "max-age=60"
        };
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-status: ringway; hit; ttl=99999\r\n\
                 cache-status: edge; detail=\"via ringway\", \"ringway\"; hit, Ringway; hit\r\n\
                 cache-control: {cc}\r\ncontent-length: 2\r\n\r\nok"
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let kept = "edge; detail=\"via ringway\", Ringway; hit";
    let miss = get(gw.addr, "/h");
    assert_eq!(
        status_lines(&miss),
        [kept, "ringway; fwd=uri-miss; fwd-status=200; stored"],
        "{miss:?}"
    );
    let hit = get(gw.addr, "/h");
    let lines = status_lines(&hit);
    assert_eq!(lines.len(), 2, "{hit:?}");
    assert_eq!(lines[0], kept, "{hit:?}");
    assert!(lines[1].starts_with("ringway; hit; ttl="), "{hit:?}");
    assert!(!lines[1].contains("99999"), "{hit:?}");
    // Relayed, not stored.
    let passed = get(gw.addr, "/n");
    assert_eq!(
        status_lines(&passed),
        [
            kept,
            "ringway; fwd=uri-miss; fwd-status=200; detail=no-store"
        ],
        "{passed:?}"
    );
    assert_eq!(up.hits(), 2);
}

/// RFC 9110 §5.3, §14.2: two `Range` lines combine into one field value, `bytes=0-1,
/// bytes=3-4`, which is not a valid ranges-specifier: the server ignores it and answers 200
/// with the whole representation. `If-Range` is then ignored too (§13.1.5: it applies only
/// with a Range the server would honour).
#[test]
fn rfc9110_14_2_two_range_lines_are_ignored_and_get_the_whole_representation() {
    let up = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"r\"\r\ncontent-length: 10\r\n\r\n0123456789"
                .to_vec(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    get(gw.addr, "/r");
    for extra in ["", "If-Range: \"r\"\r\n", "If-Range: \"old\"\r\n"] {
        let r = get_h(
            gw.addr,
            "/r",
            &format!("Range: bytes=0-1\r\nRange: bytes=3-4\r\n{extra}"),
        );
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "0123456789"),
            "{extra}: {r:?}"
        );
        assert!(!r.has("content-range"), "{extra}: {r:?}");
    }
    // One line still gets its part.
    let r = get_h(gw.addr, "/r", "Range: bytes=3-4\r\nIf-Range: \"r\"\r\n");
    assert_eq!((r.status, r.text().as_str()), (206, "34"), "{r:?}");
    assert_eq!(up.hits(), 1);
}

/// RFC 9111 §5.2.1.2, §1.2.2: `max-stale=abc` is not delta-seconds; an invalid argument must
/// not make the client accept more staleness than a valid one would: it counts as
/// `max-stale=0` (no staleness, and no stale answer under `stale-while-revalidate`), as an
/// invalid `max-age` counts as 0 (§5.2.1.1) and an invalid `min-fresh` as the longest
/// (§5.2.1.3): the stored response is validated.
#[test]
fn rfc9111_5_2_1_an_invalid_request_directive_argument_accepts_no_more_staleness() {
    // Stale by four seconds from the start (Age 5, max-age=1), within its SWR window.
    let (up, _) =
        counting_origin("cache-control: max-age=1, stale-while-revalidate=600\r\nage: 5\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/s").text(), "v1");
    // A bare max-stale takes any staleness: answered from the store.
    let r = get_h(gw.addr, "/s", "Cache-Control: max-stale\r\n");
    assert_eq!(r.text(), "v1", "{r:?}");
    assert_eq!(up.hits(), 1);
    for (i, cc) in ["max-stale=abc", "max-stale=", "max-stale=-1"]
        .iter()
        .enumerate()
    {
        let r = get_h(gw.addr, "/s", &format!("Cache-Control: {cc}\r\n"));
        assert!(!status_of(&r).contains("hit"), "{cc}: {r:?}");
        assert_eq!(r.text(), format!("v{}", i + 2), "{cc}: {r:?}");
    }
    let (up, _) = counting_origin("cache-control: max-age=600\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/f").text(), "v1");
    assert_eq!(
        get_h(gw.addr, "/f", "Cache-Control: min-fresh=5\r\n").text(),
        "v1"
    );
    for (i, cc) in ["min-fresh=abc", "max-age=abc"].iter().enumerate() {
        let r = get_h(gw.addr, "/f", &format!("Cache-Control: {cc}\r\n"));
        assert!(!status_of(&r).contains("hit"), "{cc}: {r:?}");
        assert_eq!(r.text(), format!("v{}", i + 2), "{cc}: {r:?}");
    }
}

/// An origin whose answer (storable for a minute) says what it was asked: the request's body,
/// or `plain` when it has none, and the `X-Original-URL` it saw.
fn telling_origin() -> Upstream {
    Upstream::start(|req| {
        let mut body = if req.body.is_empty() {
            b"plain".to_vec()
        } else {
            req.body.clone()
        };
        if let Some(u) = req.header("x-original-url") {
            body = format!("as {u}").into_bytes();
        }
        let mut v = format!(
            "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(&body);
        Reply::Raw(v)
    })
}

/// RFC 9110 §9.3.1: content in a GET has no generally defined semantics, but an origin that
/// reads it answers per body, and the key has only the URL: a GET (or HEAD) with a body is
/// forwarded as it is, never answered from the store, stored, or coalesced
/// (`fwd=bypass; detail=request-body`).
#[test]
fn rfc9110_9_3_1_a_get_with_a_body_is_neither_answered_from_the_store_nor_stored() {
    let up = telling_origin();
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let with = |body: &str| {
        request(
            gw.addr,
            format!(
                "GET /b HTTP/1.1\r\nHost: test.local\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let r = with("q1");
    assert_eq!(r.text(), "q1");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=bypass; fwd-status=200; detail=request-body"],
        "{r:?}"
    );
    assert_eq!(with("q2").text(), "q2");
    let chunked = request(
        gw.addr,
        b"GET /b HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nq3\r\n0\r\n\r\n",
    );
    assert_eq!(chunked.text(), "q3", "{chunked:?}");
    // Nothing of theirs was stored, and what a plain GET stores answers no GET with a body.
    assert_eq!(get(gw.addr, "/b").text(), "plain");
    assert_eq!(get(gw.addr, "/b").text(), "plain");
    assert_eq!(up.hits(), 4);
    assert_eq!(with("q4").text(), "q4");
    assert_eq!(up.hits(), 5);
    // RFC 9111 §5.2.1.7: nothing stored may answer it, and it is not forwarded.
    let r = request(
        gw.addr,
        b"GET /b HTTP/1.1\r\nHost: test.local\r\nCache-Control: only-if-cached\r\n\
          Content-Length: 2\r\n\r\nq5",
    );
    assert_eq!(r.status, 504, "{r:?}");
    assert!(status_of(&r).contains("detail=request-body"), "{r:?}");
    assert_eq!(up.hits(), 5);
}

/// Web cache poisoning: request headers that some origins obey to answer for another URL,
/// method or host (`X-Original-URL`, `X-Rewrite-URL`, `X-HTTP-Method-Override`,
/// `X-HTTP-Method`, `X-Method-Override`, `X-Host`, `X-Forwarded-Scheme`) are not in the key
/// (RFC 9111 §4: a stored response is reused only for a request it suits). A request with one
/// is forwarded as it is, never answered from the store or stored
/// (`fwd=bypass; detail=override-header`), unless the route keys on that header.
#[test]
fn rfc9111_4_requests_with_unkeyed_override_headers_bypass_the_store() {
    let up = telling_origin();
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let r = get_h(gw.addr, "/p", "X-Original-URL: /admin\r\n");
    assert_eq!(r.text(), "as /admin");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=bypass; fwd-status=200; detail=override-header"],
        "{r:?}"
    );
    // Not stored under /p: the plain request gets the plain answer.
    assert_eq!(get(gw.addr, "/p").text(), "plain");
    assert_eq!(up.hits(), 2);
    for h in [
        "x-original-url: /x",
        "X-Rewrite-URL: /x",
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "X-Host: evil.example",
        "X-Forwarded-Scheme: http",
    ] {
        let before = up.hits();
        let r = get_h(gw.addr, "/p", &format!("{h}\r\n"));
        assert!(
            status_of(&r).contains("detail=override-header"),
            "{h}: {r:?}"
        );
        assert_eq!(up.hits(), before + 1, "{h}: answered from the store");
    }
    // A method override to an unsafe method (DELETE above) invalidated /p, as the method
    // itself would (RFC 9111 §4.4): the next plain GET is a miss that stores it again; an
    // override to a safe method leaves it stored.
    let before = up.hits();
    let r = get(gw.addr, "/p");
    assert!(!status_of(&r).contains("hit"), "invalidated: {r:?}");
    assert_eq!(up.hits(), before + 1);
    let r = get_h(gw.addr, "/p", "X-HTTP-Method-Override: GET\r\n");
    assert!(status_of(&r).contains("detail=override-header"), "{r:?}");
    assert!(status_of(&get(gw.addr, "/p")).contains("hit"));
    let r = get_h(gw.addr, "/p", "X-HTTP-Method-Override: PATCH\r\n");
    assert!(status_of(&r).contains("detail=override-header"), "{r:?}");
    assert!(
        !status_of(&get(gw.addr, "/p")).contains("hit"),
        "invalidated"
    );
    // With `only-if-cached`, a stored response or a 504 (RFC 9111 §5.2.1.7), as for the
    // other bypassed requests: the store may not answer it, so a 504, not forwarded, and
    // nothing invalidated, since nothing reached the origin.
    assert!(status_of(&get(gw.addr, "/p")).contains("hit"));
    let before = up.hits();
    let r = get_h(
        gw.addr,
        "/p",
        "X-HTTP-Method-Override: DELETE\r\nCache-Control: only-if-cached\r\n",
    );
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(
        status_lines(&r),
        ["ringway; fwd=bypass; detail=override-header"],
        "{r:?}"
    );
    assert_eq!(up.hits(), before, "not forwarded");
    assert!(
        status_of(&get(gw.addr, "/p")).contains("hit"),
        "not invalidated"
    );
    // Lookalikes of the same lengths are plain headers: a hit.
    let r = get_h(
        gw.addr,
        "/p",
        "X-Hosts: a\r\nX-Rewrite-URI: b\r\nx-originalurl1: c\r\n",
    );
    assert!(status_of(&r).contains("hit"), "{r:?}");
    // A route that keys on the header caches by it.
    let gw = TestGateway::start(
        &cache_config(up.addr, "key = { headers = [\"x-original-url\"] }", ""),
        D,
    );
    let before = up.hits();
    assert_eq!(
        get_h(gw.addr, "/k", "X-Original-URL: /a\r\n").text(),
        "as /a"
    );
    let r = get_h(gw.addr, "/k", "X-Original-URL: /a\r\n");
    assert!(status_of(&r).contains("hit"), "{r:?}");
    assert_eq!(get(gw.addr, "/k").text(), "plain");
    assert_eq!(up.hits(), before + 2);
    // A route that removes (or sets) the header: it never reaches the origin as sent.
    let gw = TestGateway::start(
        &config(
            &[up.addr],
            "[[routes]]\nupstream = \"up\"\nrequest_headers = { remove = [\"x-original-url\"] }\ncache = { }\n",
        ),
        D,
    );
    let before = up.hits();
    assert_eq!(
        get_h(gw.addr, "/r", "X-Original-URL: /a\r\n").text(),
        "plain"
    );
    let r = get_h(gw.addr, "/r", "X-Original-URL: /b\r\n");
    assert!(status_of(&r).contains("hit"), "{r:?}");
    assert_eq!(up.hits(), before + 1);
}

/// RFC 5861 §3 with RFC 9111 §4.1: a background revalidation goes upstream as the request
/// that triggered it would (here from a trusted proxy, `server.trusted_proxies`: its
/// `X-Forwarded-Proto: https` and `X-Forwarded-For` chain kept), and its answer is stored
/// under the selecting values that later requests compute. Before, the revalidation was sent
/// as from an untrusted peer (`X-Forwarded-Proto: http`, the proxy's address alone), and
/// stored under those values: an origin varying on `X-Forwarded-Proto` answered the http
/// variant for https clients, and no later request ever matched the stored answer (each stale
/// hit revalidated again).
#[test]
fn rfc5861_3_background_revalidation_forwards_as_the_trusted_proxys_request_did() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let cc = if i == 1 {
            "max-age=0, stale-while-revalidate=60"
        } else {
            "max-age=60"
        };
        Reply::Raw(
            format!("HTTP/1.1 200 OK\r\ncache-control: {cc}\r\nvary: x-forwarded-proto, x-forwarded-for\r\ncontent-length: 2\r\n\r\nv{i}")
                .into_bytes(),
        )
    });
    let gw = TestGateway::start(
        &cache_config(up.addr, "", "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n"),
        D,
    );
    let via_lb = "x-forwarded-proto: https\r\nx-forwarded-for: 198.51.100.7\r\n";
    assert_eq!(get_h(gw.addr, "/lb", via_lb).text(), "v1");
    let first = up.last();
    assert_eq!(first.headers_named("x-forwarded-proto"), vec!["https"]);
    let r = get_h(gw.addr, "/lb", via_lb);
    assert_eq!(r.text(), "v1", "{r:?}");
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 2));
    let reval = up.last();
    assert_eq!(reval.headers_named("x-forwarded-proto"), vec!["https"]);
    assert_eq!(
        reval.headers_named("x-forwarded-for"),
        first.headers_named("x-forwarded-for")
    );
    // The revalidated answer is what the next request from the proxy gets, from the store.
    assert!(eventually(Duration::from_secs(5), || {
        let r = get_h(gw.addr, "/lb", via_lb);
        r.text() == "v2" && status_of(&r).starts_with("ringway; hit")
    }));
    assert_eq!(n.load(Ordering::SeqCst), 2, "one revalidation, then hits");
}

/// RFC 9111 §4.1: `traceparent` goes upstream naming this hop's new span, a value no other
/// request sends, so a response that varies on it is never served to another request, even
/// one carrying the same `X-Request-Id` (which the gateway passes on when valid). Before, the
/// value compared was derived from the request id: two requests with the same id matched.
#[test]
fn rfc9111_4_1_vary_on_traceparent_never_matches_another_request_with_the_same_request_id() {
    let (up, _) = counting_origin("cache-control: max-age=60\r\nvary: traceparent\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let tp = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";
    let same = format!("{tp}x-request-id: same-id\r\n");
    let a = get_h(gw.addr, "/tp", &same);
    assert_eq!(a.text(), "v1", "{a:?}");
    let b = get_h(gw.addr, "/tp", &same);
    assert_eq!(b.text(), "v2", "{b:?}");
    assert_eq!(up.hits(), 2);
    // The origin got two different traceparents (a new span each time).
    let seen = up.wait_for(Duration::from_secs(5), |s| {
        s.len() == 2 && s[0].header("traceparent") != s[1].header("traceparent")
    });
    assert!(seen);
}

/// RFC 9211 §2.5 (`stored`: the cache stored the response): the member goes out with the
/// response head, so it says `stored` only of a response whose whole body was in hand then
/// (stored before the head is written). One whose `Content-Length` body is still on its way
/// may yet be cut by the upstream and never stored: its member does not claim it
/// (`detail=streamed`, the store's choice being made once the body has come whole), whether
/// the body then comes whole (and is stored: the next request is a hit) or is cut (not
/// stored: the next request goes upstream again).
#[test]
fn rfc9211_2_5_stored_is_said_only_of_a_body_in_hand_when_the_head_goes_out() {
    use std::io::Read;
    for d in DRIVERS {
        // A small body, read with its head: stored before the head goes out, and said so.
        let (up, _) = counting_origin("cache-control: max-age=60\r\n");
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let a = get(gw.addr, "/small");
        assert_eq!(
            status_of(&a),
            "ringway; fwd=uri-miss; fwd-status=200; stored",
            "{d:?}"
        );
        hit(&get(gw.addr, "/small"), "v1");
        drop(gw);

        // Cut: 1000 of 10000 bytes, then the upstream closes.
        let cut = Upstream::start(|_| {
            let mut head = b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\n\
                             content-length: 10000\r\n\r\n"
                .to_vec();
            head.extend(std::iter::repeat_n(b'@', 1000));
            Reply::Script(vec![Step::Write(head), Step::Close])
        });
        let gw = TestGateway::start(&cache_config(cut.addr, "", ""), d);
        for round in 1..=2 {
            let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            std::io::Write::write_all(&mut s, b"GET /cut HTTP/1.1\r\nHost: test.local\r\n\r\n")
                .unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            let status = text
                .lines()
                .find_map(|l| l.strip_prefix("cache-status: "))
                .unwrap_or_else(|| panic!("{d:?}: no cache-status: {text}"))
                .to_string();
            assert!(!status.contains("stored"), "{d:?} round {round}: {status}");
            assert!(status.contains("detail=streamed"), "{d:?}: {status}");
            // Cut, so never stored: each request goes upstream.
            assert_eq!(cut.hits(), round, "{d:?}");
        }
        drop(gw);

        // Whole, but after its head: not said stored, yet stored once complete.
        let go = Event::new();
        let up = two_part_origin(1000, 64 * 1024, false, go.clone());
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(
            &mut s,
            b"GET /late HTTP/1.1\r\nHost: test.local\r\nconnection: close\r\n\r\n",
        )
        .unwrap();
        let mut conn = (s, Vec::new());
        let head = read_head_until(&mut conn, |b| !b.is_empty()).to_ascii_lowercase();
        let status = head
            .lines()
            .find_map(|l| l.strip_prefix("cache-status: "))
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            status, "ringway; fwd=uri-miss; fwd-status=200; detail=streamed",
            "{d:?}"
        );
        go.set();
        let (s, got) = conn;
        let mut s = s;
        let (_, body) = read_whole_response(&mut s, got).expect("the whole body");
        assert_eq!(body.len(), 1000 + 64 * 1024, "{d:?}");
        let r = get(gw.addr, "/late");
        assert!(status_of(&r).contains("hit"), "{d:?}: {r:?}");
        assert_eq!(up.hits(), 1, "{d:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Pieces: 206 responses stored (RFC 9111 §3.3) and ranges served from them (RFC 9110 §14.2).

/// An origin of the representation `rep` with the header lines `fields`: a GET whose one
/// `Range` is `bytes=a-b`, `bytes=a-` or `bytes=-n` (and whose `If-Range`, if any, is
/// `if_range`) gets that part as a 206 with its Content-Range; any other request the whole
/// as a 200 (no body for HEAD).
fn ranged_origin(rep: Vec<u8>, fields: &'static str, if_range: &'static str) -> Upstream {
    Upstream::start(move |req| {
        let n = rep.len();
        let ranges = req.headers_named("range");
        let part = match ranges[..] {
            [r] if req.method == "GET" && req.header("if-range").is_none_or(|v| v == if_range) => r
                .strip_prefix("bytes=")
                .and_then(|spec| spec.split_once('-'))
                .and_then(|(a, b)| match (a.parse::<usize>(), b.parse::<usize>()) {
                    (Ok(a), Ok(b)) => Some((a, b.min(n - 1))),
                    (Ok(a), Err(_)) if b.is_empty() => Some((a, n - 1)),
                    (Err(_), Ok(k)) if a.is_empty() => Some((n.saturating_sub(k), n - 1)),
                    _ => None,
                })
                .filter(|(a, b)| a <= b && *b < n),
            _ => None,
        };
        let (head, body) = match part {
            Some((a, b)) => (
                format!(
                    "HTTP/1.1 206 Partial Content\r\n{fields}content-range: bytes {a}-{b}/{n}\r\ncontent-length: {}\r\n\r\n",
                    b - a + 1
                ),
                &rep[a..=b],
            ),
            None => (
                format!("HTTP/1.1 200 OK\r\n{fields}content-length: {n}\r\n\r\n"),
                &rep[..],
            ),
        };
        let mut v = head.into_bytes();
        if req.method != "HEAD" {
            v.extend_from_slice(body);
        }
        Reply::Raw(v)
    })
}

/// `r` is the part `body` of a 10-byte representation, `content_range` its one Content-Range.
fn part(r: &Resp, body: &str, content_range: &str) {
    assert_eq!((r.status, r.text().as_str()), (206, body), "{r:?}");
    assert_eq!(r.all("content-range"), vec![content_range], "{r:?}");
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
}

/// RFC 9111 §3.3: a 206 with one `Content-Range: bytes a-b/N` is stored as a piece of its
/// representation; a later GET whose one range lies wholly inside it is answered from it
/// (RFC 9110 §14.2: 206, the part's Content-Range against the whole length, §14.4), with Age
/// and the stored fields; a range it does not hold goes upstream.
#[test]
fn rfc9111_3_3_a_stored_206_answers_the_ranges_inside_it() {
    for d in DRIVERS {
        let up = ranged_origin(
            b"0123456789".to_vec(),
            "cache-control: max-age=60\r\netag: \"r\"\r\nx-origin: o\r\n",
            "\"r\"",
        );
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let r = get_h(gw.addr, "/p", "Range: bytes=2-7\r\n");
        part(&r, "234567", "bytes 2-7/10");
        assert!(status_of(&r).contains("stored"), "{d:?}: {r:?}");
        for (range, body, cr) in [
            ("bytes=2-7", "234567", "bytes 2-7/10"),
            ("bytes=3-5", "345", "bytes 3-5/10"),
            ("bytes=7-7", "7", "bytes 7-7/10"),
            ("bytes=2-", "", ""),
            ("bytes=3-4\r\nIf-Range: \"r\"", "34", "bytes 3-4/10"),
        ] {
            let r = get_h(gw.addr, "/p", &format!("Range: {range}\r\n"));
            if body.is_empty() {
                // `2-` is `2-9`: not all of it is stored.
                assert!(status_of(&r).contains("fwd=uri-miss"), "{d:?}: {r:?}");
                continue;
            }
            part(&r, body, cr);
            assert!(status_of(&r).starts_with("ringway; hit"), "{d:?}: {r:?}");
            assert!(r.has("age"), "{r:?}");
            assert_eq!(r.header("etag"), Some("\"r\""));
            assert_eq!(r.header("x-origin"), Some("o"));
        }
        assert_eq!(up.hits(), 2, "{d:?}");
        // The range fetched last (2-9) answers what it holds.
        part(
            &get_h(gw.addr, "/p", "Range: bytes=-1\r\n"),
            "9",
            "bytes 9-9/10",
        );
        assert_eq!(up.hits(), 2, "{d:?}");
        // RFC 9110 §13.2.2: the client's conditionals are answered from the piece's validators.
        let r = get_h(
            gw.addr,
            "/p",
            "Range: bytes=3-4\r\nIf-None-Match: \"r\"\r\n",
        );
        assert_eq!(r.status, 304, "{d:?}: {r:?}");
        assert!(!r.has("content-range"), "{r:?}");
        // If-Range naming another validator (§13.1.5: the whole representation is wanted):
        // upstream.
        let r = get_h(gw.addr, "/p", "Range: bytes=3-4\r\nIf-Range: \"old\"\r\n");
        assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
        assert!(status_of(&r).contains("fwd=uri-miss"), "{d:?}: {r:?}");
        assert_eq!(up.hits(), 3, "{d:?}");
    }
}

/// RFC 9111 §3.3, §3.4: a stored piece answers only a GET with one range inside it, always as
/// a 206: never a request without `Range`, a HEAD, several ranges or a unit other than bytes
/// (all go upstream). A whole response stored for the URL answers any range before a piece.
#[test]
fn rfc9111_3_3_a_stored_piece_never_answers_as_a_200_nor_without_a_range() {
    let up = ranged_origin(b"0123456789".to_vec(), "cache-control: max-age=60\r\n", "");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    part(
        &get_h(gw.addr, "/p", "Range: bytes=2-7\r\n"),
        "234567",
        "bytes 2-7/10",
    );
    let head = |extra: &str| {
        request(
            gw.addr,
            format!("HEAD /p HTTP/1.1\r\nHost: test.local\r\n{extra}\r\n").as_bytes(),
        )
    };
    for extra in ["", "Range: bytes=3-4\r\n"] {
        let r = head(extra);
        assert_eq!((r.status, r.body.len()), (200, 0), "{extra}: {r:?}");
        assert!(!status_of(&r).contains("hit"), "{extra}: {r:?}");
    }
    assert_eq!(up.hits(), 3);
    for (extra, n) in [
        ("Range: bytes=3-4\r\nRange: bytes=5-6\r\n", 4),
        ("Range: bytes=3-4, 5-6\r\n", 5),
        ("Range: items=3-4\r\n", 6),
    ] {
        let r = get_h(gw.addr, "/p", extra);
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "0123456789"),
            "{extra}: {r:?}"
        );
        assert!(!r.has("content-range"), "{extra}: {r:?}");
        // (The 200 is stored; the next request of this loop is answered from it.)
        if n == 4 {
            assert!(status_of(&r).contains("fwd=uri-miss"), "{extra}: {r:?}");
        } else {
            assert!(status_of(&r).starts_with("ringway; hit"), "{extra}: {r:?}");
        }
    }
    // The whole response answers any range now, before the piece.
    let r = get_h(gw.addr, "/p", "Range: bytes=0-1\r\n");
    part(&r, "01", "bytes 0-1/10");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    let r = get_h(gw.addr, "/p", "");
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"));

    // A 206 to a request without `Range` is not stored, and not served.
    let up = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\ncontent-range: bytes 0-4/10\r\ncontent-length: 5\r\n\r\n01234"
                .to_vec(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    for _ in 0..2 {
        let r = get_h(gw.addr, "/q", "");
        assert_eq!(r.status, 206);
        assert!(status_of(&r).contains("detail=status"), "{r:?}");
    }
    assert_eq!(up.hits(), 2);
}

/// RFC 9110 §14.4, §15.3.7, RFC 9111 §3.3: a 206 is stored only when its one `Content-Range`
/// names a whole, known range exactly as long as its body. Hostile or broken values (the
/// range longer or shorter than the body, an end before the start or past the length, an
/// unknown length, numbers past 2^64, two lines, the unsatisfied form, `multipart/byteranges`,
/// a chunked body) are relayed as they are, never stored, and never take the gateway down.
#[test]
fn rfc9110_14_4_hostile_content_range_values_are_never_stored() {
    let cases: [(&str, &str); 12] = [
        // The cache-tests suite's own 206: six bytes named, five sent.
        ("content-range: bytes 4-9/10\r\ncontent-length: 5\r\n", "01234"),
        ("content-range: bytes 0-4/10\r\ncontent-length: 4\r\n", "0123"),
        ("content-range: bytes 5-4/10\r\ncontent-length: 1\r\n", "0"),
        ("content-range: bytes 0-10/10\r\ncontent-length: 11\r\n", "01234567890"),
        ("content-range: bytes 0-4/*\r\ncontent-length: 5\r\n", "01234"),
        ("content-range: bytes */10\r\ncontent-length: 5\r\n", "01234"),
        (
            "content-range: bytes 0-18446744073709551615/18446744073709551616\r\ncontent-length: 5\r\n",
            "01234",
        ),
        (
            "content-range: bytes 18446744073709551614-18446744073709551618/99999999999999999999\r\ncontent-length: 5\r\n",
            "01234",
        ),
        (
            "content-range: bytes 0-4/10\r\ncontent-range: bytes 0-4/10\r\ncontent-length: 5\r\n",
            "01234",
        ),
        (
            "content-type: multipart/byteranges; boundary=x\r\ncontent-range: bytes 0-4/10\r\ncontent-length: 5\r\n",
            "01234",
        ),
        ("content-length: 5\r\n", "01234"),
        (
            "content-range: bytes 0-4/10\r\ntransfer-encoding: chunked\r\n",
            "5\r\n01234\r\n0\r\n\r\n",
        ),
    ];
    for (fields, body) in cases {
        let raw = format!(
            "HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\n{fields}\r\n{body}"
        );
        let up = Upstream::start(move |_| Reply::Raw(raw.clone().into_bytes()));
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        for i in 1..=2 {
            let mut c = Client::connect(gw.addr);
            c.send(b"GET /h HTTP/1.1\r\nHost: test.local\r\nRange: bytes=0-4\r\nConnection: close\r\n\r\n");
            // Relayed as it came (or cut, when its framing does not hold): never stored.
            let r = c.read_response();
            if let Some(r) = r {
                assert_eq!(r.status, 206, "{fields}");
                assert!(!status_of(&r).contains("stored"), "{fields}: {r:?}");
            }
            assert_eq!(up.hits(), i, "{fields}");
        }
        let stats = ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2)).unwrap();
        assert_eq!(stats[0].entries, 0, "{fields}: {stats:?}");
        // The gateway still answers.
        let r = get_h(gw.addr, "/h", "Range: bytes=0-4\r\n");
        assert_eq!(r.status, 206, "{fields}");
    }
}

/// RFC 9111 §3.3: a piece is stored as any response is: Vary selects it (§4.1), a purge
/// removes it, an unsafe method's invalidation (§4.4) too, `max_object_bytes` bounds it,
/// `no-store` and `private` keep it out (§3), and a stale one answers nothing (§4.2).
#[test]
fn rfc9111_3_3_pieces_follow_vary_purges_invalidations_and_the_object_bound() {
    let up = ranged_origin(
        b"0123456789".to_vec(),
        "cache-control: max-age=60\r\nvary: accept-language\r\n",
        "",
    );
    let (gw, api) = gateway_with_admin(up.addr);
    let en = "Range: bytes=0-4\r\nAccept-Language: en\r\n";
    let fr = "Range: bytes=0-4\r\nAccept-Language: fr\r\n";
    let hit_part = |extra: &str| {
        let r = get_h(gw.addr, "/v", extra);
        part(&r, "01234", "bytes 0-4/10");
        status_of(&r).starts_with("ringway; hit")
    };
    assert!(!hit_part(en));
    assert!(hit_part(en));
    assert!(!hit_part(fr));
    assert!(hit_part(fr));
    assert!(hit_part(en));
    assert_eq!(up.hits(), 2);
    let r = request(
        api,
        b"POST /cache/purge?url=test.local/v HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.json()["purged"], 2, "{}", r.text());
    assert!(!hit_part(en));
    assert!(hit_part(en));
    let r = request(
        gw.addr,
        b"POST /v HTTP/1.1\r\nHost: test.local\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(!hit_part(en));
    assert_eq!(up.hits(), 5);

    // `max_object_bytes` bounds a piece as it bounds a whole response (streamed through).
    let rep: Vec<u8> = (0..40 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let up = ranged_origin(rep.clone(), "cache-control: max-age=60\r\n", "");
    let gw = TestGateway::start(
        &cache_config(up.addr, "max_object_bytes = \"16KiB\"", ""),
        D,
    );
    for _ in 0..2 {
        let r = get_h(gw.addr, "/big", "Range: bytes=0-20479\r\n");
        assert_eq!((r.status, &r.body[..]), (206, &rep[..20480]));
        assert!(status_of(&r).contains("detail=too-large"), "{r:?}");
    }
    assert_eq!(up.hits(), 2);

    // Never stored: `no-store`, `private`; stored but stale at once: `max-age=0`.
    for cc in ["no-store", "private, max-age=60", "max-age=0"] {
        let fields: &'static str = Box::leak(format!("cache-control: {cc}\r\n").into_boxed_str());
        let up = ranged_origin(b"0123456789".to_vec(), fields, "");
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        for _ in 0..2 {
            let r = get_h(gw.addr, "/n", "Range: bytes=0-4\r\n");
            part(&r, "01234", "bytes 0-4/10");
            assert!(!status_of(&r).contains("hit"), "{cc}: {r:?}");
        }
        assert_eq!(up.hits(), 2, "{cc}");
    }
}

/// RFC 9111 §3.3 for a piece larger than the first read: captured as it streams to the
/// client (never published to other requests waiting for the URL), stored, and a range
/// inside it answered from the store.
#[test]
fn rfc9111_3_3_a_streamed_206_is_captured_and_answers_ranges_inside_it() {
    for d in DRIVERS {
        let rep: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        let up = ranged_origin(rep.clone(), "cache-control: max-age=60\r\n", "");
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), d);
        let r = get_h(gw.addr, "/s", "Range: bytes=1000-150999\r\n");
        assert_eq!(r.status, 206, "{d:?}");
        assert!(r.body == rep[1000..151000], "{d:?}");
        assert!(status_of(&r).contains("detail=streamed"), "{d:?}: {r:?}");
        let r = get_h(gw.addr, "/s", "Range: bytes=2000-99999\r\n");
        assert_eq!(r.status, 206, "{d:?}");
        assert_eq!(r.header("content-range"), Some("bytes 2000-99999/204800"));
        assert!(r.body == rep[2000..100000], "{d:?}");
        assert!(status_of(&r).starts_with("ringway; hit"), "{d:?}: {r:?}");
        // The whole representation is not what was stored: fetched.
        let r = get_h(gw.addr, "/s", "");
        assert!((r.status, r.body.len()) == (200, rep.len()), "{d:?}");
        assert_eq!(up.hits(), 2, "{d:?}");
    }
}

/// RFC 9111 §3.4, RFC 9110 §15.3.7.3: pieces of one representation (the same strong
/// entity tag and complete length) that overlap or meet are combined into one, which answers
/// ranges across both; once they hold the whole representation the cache has a complete 200
/// that answers requests without `Range` too. Pieces with another or a weak tag, or none, are
/// not combined: the newer replaces the older.
#[test]
fn rfc9111_3_4_pieces_with_one_strong_validator_are_combined() {
    let up = ranged_origin(
        b"0123456789".to_vec(),
        "cache-control: max-age=60\r\netag: \"s\"\r\nx-v: 1\r\n",
        "",
    );
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let g = |range: &str| get_h(gw.addr, "/c", &format!("Range: {range}\r\n"));
    part(&g("bytes=2-4"), "234", "bytes 2-4/10");
    part(&g("bytes=5-6"), "56", "bytes 5-6/10");
    assert_eq!(up.hits(), 2);
    let r = g("bytes=3-6");
    part(&r, "3456", "bytes 3-6/10");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    assert_eq!(r.header("x-v"), Some("1"));
    // Apart (7 is missing) and smaller: not combined, and the larger stored piece stays (a
    // client probing a few bytes does not evict what answers more).
    let r = g("bytes=8-9");
    part(&r, "89", "bytes 8-9/10");
    assert!(status_of(&r).contains("detail=smaller-piece"), "{r:?}");
    assert!(status_of(&g("bytes=2-4")).starts_with("ringway; hit"));
    assert_eq!(up.hits(), 3);
    // 5-9 meets 2-6 (2-9), then 0-1 the union: the whole representation, a 200.
    part(&g("bytes=5-9"), "56789", "bytes 5-9/10");
    part(&g("bytes=0-1"), "01", "bytes 0-1/10");
    assert_eq!(up.hits(), 5);
    let r = get_h(gw.addr, "/c", "");
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    assert!(!r.has("content-range"), "{r:?}");
    assert_eq!(r.header("etag"), Some("\"s\""));
    part(&g("bytes=1-8"), "12345678", "bytes 1-8/10");
    assert_eq!(up.hits(), 5);
    // One piece that holds the whole representation is the complete 200 too.
    let g = |range: &str| get_h(gw.addr, "/d", &format!("Range: {range}\r\n"));
    part(&g("bytes=0-"), "0123456789", "bytes 0-9/10");
    let r = get_h(gw.addr, "/d", "");
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    assert_eq!(up.hits(), 6);
    // Apart and larger: the newer replaces the older.
    let g = |range: &str| get_h(gw.addr, "/e", &format!("Range: {range}\r\n"));
    part(&g("bytes=0-1"), "01", "bytes 0-1/10");
    part(&g("bytes=4-8"), "45678", "bytes 4-8/10");
    assert!(status_of(&g("bytes=5-6")).starts_with("ringway; hit"));
    assert!(!status_of(&g("bytes=0-1")).contains("hit"));
    assert_eq!(up.hits(), 9);

    for etag in ["etag: W/\"w\"\r\n", ""] {
        let fields: &'static str =
            Box::leak(format!("cache-control: max-age=60\r\n{etag}").into_boxed_str());
        let up = ranged_origin(b"0123456789".to_vec(), fields, "");
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        let g = |range: &str| get_h(gw.addr, "/w", &format!("Range: {range}\r\n"));
        part(&g("bytes=2-4"), "234", "bytes 2-4/10");
        part(&g("bytes=5-6"), "56", "bytes 5-6/10");
        let r = g("bytes=3-6");
        assert!(!status_of(&r).contains("hit"), "{etag}: {r:?}");
        assert_eq!(up.hits(), 3, "{etag}");
    }
}

/// RFC 9111 §3.4 with purges by surrogate key: a combination holds the bytes of both
/// responses, so it carries the tags of both; a purge by either takes it. Before, it kept the
/// newer response's tags only, and a purge of the older's tag left its bytes served.
#[test]
fn rfc9111_3_4_a_combined_piece_keeps_both_responses_surrogate_keys() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let range = req.header("range").unwrap_or_default().to_string();
        n2.fetch_add(1, Ordering::SeqCst);
        let (tag, from, body) = match range.as_str() {
            "bytes=2-4" => ("a", 2, "234"),
            "bytes=5-6" => ("b", 5, "56"),
            _ => ("c", 3, "3456"),
        };
        let to = from + body.len() - 1;
        Reply::Raw(
            format!(
                "HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\netag: \"s\"\r\nsurrogate-key: {tag}\r\ncontent-range: bytes {from}-{to}/10\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let g = |range: &str| get_h(gw.addr, "/t", &format!("Range: {range}\r\n"));
    part(&g("bytes=2-4"), "234", "bytes 2-4/10");
    part(&g("bytes=5-6"), "56", "bytes 5-6/10");
    let r = g("bytes=3-6");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 2);
    // The older response's tag: the combination goes with it.
    hard_purge(&gw, PurgeTarget::Tag(b"a".to_vec()));
    let r = g("bytes=3-6");
    assert!(!status_of(&r).contains("hit"), "{r:?}");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

/// RFC 9111 §3.3, §4.3.1: a validation of a stored whole response goes without the client's
/// `Range`; a 206 that answers it is no piece of anything asked for: relayed, never stored.
#[test]
fn rfc9111_3_3_a_206_to_a_validation_is_not_stored() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_| {
        let raw: &[u8] = if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"v\"\r\ncontent-length: 10\r\n\r\n0123456789"
        } else {
            b"HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\netag: \"v\"\r\ncontent-range: bytes 0-4/10\r\ncontent-length: 5\r\n\r\n01234"
        };
        Reply::Raw(raw.to_vec())
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/v").text(), "0123456789");
    let r = get_h(gw.addr, "/v", "Range: bytes=0-4\r\n");
    assert_eq!((r.status, r.text().as_str()), (206, "01234"), "{r:?}");
    let sent = up.last();
    assert_eq!(sent.header("if-none-match"), Some("\"v\""));
    assert_eq!(sent.header("range"), None);
    assert!(!status_of(&r).contains("stored"), "{r:?}");
    let stats = ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2)).unwrap();
    assert_eq!(stats[0].entries, 1, "{stats:?}");
}

/// RFC 9111 §3.4 ("A cache MAY complete a stored incomplete response by making a subsequent
/// range request ... and combining the successful response with the stored response"): an
/// origin whose `/k` is stored first as the piece `bytes 0-4/10` (`"0123456789"`, strong ETag
/// `"a"`, fresh). A request without `Range` gets `whole` (a 200 of `"abcdefghij"` with ETag
/// `"b"`: a newer representation); one with `Range: bytes=5-` gets `rest(if_range)`. Every
/// request is recorded (`Upstream::seen`).
fn completing_origin(rest: impl Fn(Option<&str>) -> String + Send + Sync + 'static) -> Upstream {
    Upstream::start(move |req| {
        let raw = match req.header("range") {
            Some("bytes=0-4") => "HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\netag: \"a\"\r\nx-v: 1\r\ncontent-range: bytes 0-4/10\r\ncontent-length: 5\r\n\r\n01234".to_string(),
            Some("bytes=5-") => rest(req.header("if-range")),
            _ => "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"b\"\r\ncontent-length: 10\r\n\r\nabcdefghij".to_string(),
        };
        Reply::Raw(raw.into_bytes())
    })
}

/// The requests `up` received: their `Range` and `If-Range`.
fn ranges_seen(up: &Upstream) -> Vec<(Option<String>, Option<String>)> {
    let seen = up.seen.lock().unwrap();
    seen.iter()
        .map(|r| {
            (
                r.header("range").map(str::to_string),
                r.header("if-range").map(str::to_string),
            )
        })
        .collect()
}

fn piece_0_4(gw: &TestGateway) {
    part(
        &get_h(gw.addr, "/k", "Range: bytes=0-4\r\n"),
        "01234",
        "bytes 0-4/10",
    );
}

/// RFC 9111 §3.4, RFC 9110 §13.1.5, §14.2: a GET without `Range`, with a fresh piece
/// `0-4/10` stored, asks the origin for the rest only (`Range: bytes=5-`, `If-Range` with the
/// piece's strong ETag); its 206 `5-9/10` is combined with the piece into the whole 200, which
/// is stored and answered (newer fields win, RFC 9110 §15.3.7.3), then answers requests with
/// and without `Range`. Before, the request went upstream whole.
#[test]
fn rfc9111_3_4_a_stored_piece_is_completed_with_a_range_request_for_the_rest() {
    let up = completing_origin(|if_range| {
        assert_eq!(if_range, Some("\"a\""));
        "HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\netag: \"a\"\r\nx-v: 2\r\ncontent-range: bytes 5-9/10\r\ncontent-length: 5\r\n\r\n56789".to_string()
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    piece_0_4(&gw);
    let r = get_h(gw.addr, "/k", "");
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
    assert!(!r.has("content-range"), "{r:?}");
    assert_eq!(r.header("content-length"), Some("10"), "{r:?}");
    assert_eq!(r.header("etag"), Some("\"a\""), "{r:?}");
    assert_eq!(r.header("x-v"), Some("2"), "{r:?}");
    let s = status_of(&r);
    assert!(
        s.contains("fwd=partial") && s.contains("fwd-status=206") && s.contains("stored"),
        "{r:?}"
    );
    assert_eq!(
        ranges_seen(&up),
        vec![
            (Some("bytes=0-4".into()), None),
            (Some("bytes=5-".into()), Some("\"a\"".into()))
        ]
    );
    // The whole is stored: a hit, with or without a range.
    let r = get_h(gw.addr, "/k", "");
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    let r = get_h(gw.addr, "/k", "Range: bytes=3-7\r\n");
    part(&r, "34567", "bytes 3-7/10");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    assert_eq!(up.hits(), 2);
}

/// RFC 9111 §3.4, RFC 9110 §13.1.5: the origin answers the request for the rest with a 200
/// (the whole representation, `If-Range` having failed): relayed and stored as the usual miss.
#[test]
fn rfc9111_3_4_a_200_to_the_request_for_the_rest_is_relayed_and_stored() {
    let up = completing_origin(|_| {
        "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"b\"\r\ncontent-length: 10\r\n\r\nabcdefghij".to_string()
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    piece_0_4(&gw);
    let r = get_h(gw.addr, "/k", "");
    assert_eq!((r.status, r.text().as_str()), (200, "abcdefghij"), "{r:?}");
    assert!(status_of(&r).contains("fwd-status=200"), "{r:?}");
    assert_eq!(ranges_seen(&up)[1].0.as_deref(), Some("bytes=5-"));
    let r = get_h(gw.addr, "/k", "");
    assert_eq!((r.status, r.text().as_str()), (200, "abcdefghij"), "{r:?}");
    assert!(status_of(&r).starts_with("ringway; hit"), "{r:?}");
    assert_eq!(up.hits(), 2);
}

/// RFC 9111 §3.4, RFC 9110 §15.3.7.3: a 206 to the request for the rest that is not exactly
/// the rest of the stored piece's representation (another ETag, a weak one, another range or
/// complete length, no Content-Length, several ranges) is no part of it: never combined, and
/// never relayed (the client asked for no range). The request goes upstream again without
/// `Range`, and the client gets the whole 200.
#[test]
fn rfc9111_3_4_an_unusable_206_for_the_rest_is_dropped_and_the_whole_fetched() {
    for (i, rest) in [
        "etag: \"b\"\r\ncontent-range: bytes 5-9/10\r\ncontent-length: 5\r\n\r\nfghij",
        "etag: W/\"a\"\r\ncontent-range: bytes 5-9/10\r\ncontent-length: 5\r\n\r\nfghij",
        "content-range: bytes 5-9/10\r\ncontent-length: 5\r\n\r\nfghij",
        "etag: \"a\"\r\ncontent-range: bytes 4-9/10\r\ncontent-length: 6\r\n\r\n4fghij",
        "etag: \"a\"\r\ncontent-range: bytes 5-8/10\r\ncontent-length: 4\r\n\r\nfghi",
        "etag: \"a\"\r\ncontent-range: bytes 5-9/11\r\ncontent-length: 5\r\n\r\nfghij",
        "etag: \"a\"\r\ncontent-range: bytes 5-9/10\r\ncontent-length: 4\r\n\r\nfghi",
        "etag: \"a\"\r\ncontent-range: bytes 5-9/10\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfghij\r\n0\r\n\r\n",
        "etag: \"a\"\r\ncontent-type: multipart/byteranges; boundary=x\r\ncontent-length: 5\r\n\r\nfghij",
    ]
    .into_iter()
    .enumerate()
    {
        let up = completing_origin(move |_| {
            format!("HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\n{rest}")
        });
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        piece_0_4(&gw);
        let r = get_h(gw.addr, "/k", "");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "abcdefghij"),
            "{i}: {r:?}"
        );
        assert!(!r.has("content-range"), "{i}: {r:?}");
        // RFC 9211 §2.2: forwarded because the cache had a partial response (before, this
        // said `fwd=uri-miss`: nothing stored for the URL).
        assert!(status_of(&r).contains("fwd=partial;"), "{i}: {r:?}");
        let seen = ranges_seen(&up);
        assert_eq!(seen.len(), 3, "{i}: {seen:?}");
        assert_eq!(seen[1].0.as_deref(), Some("bytes=5-"), "{i}");
        assert_eq!(seen[2], (None, None), "{i}");
        // The whole 200 fetched is stored.
        let r = get_h(gw.addr, "/k", "");
        assert_eq!(r.text(), "abcdefghij", "{i}: {r:?}");
        assert!(status_of(&r).starts_with("ringway; hit"), "{i}: {r:?}");
        assert_eq!(up.hits(), 3, "{i}");
    }
}

/// RFC 9111 §3.4, RFC 9110 §15.5.17: a 416 to the request for the rest answers the range the
/// cache added, not anything the client asked: dropped, and the whole fetched without `Range`.
/// A 500 is relayed as the usual miss relays it.
#[test]
fn rfc9111_3_4_a_416_or_500_for_the_rest_never_reaches_the_client_as_a_range_answer() {
    let up = completing_origin(|_| {
        "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */3\r\ncontent-length: 0\r\n\r\n".to_string()
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    piece_0_4(&gw);
    let r = get_h(gw.addr, "/k", "");
    assert_eq!((r.status, r.text().as_str()), (200, "abcdefghij"), "{r:?}");
    assert!(!r.has("content-range"), "{r:?}");
    assert!(status_of(&r).contains("fwd=partial;"), "{r:?}");
    let seen = ranges_seen(&up);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[1].0.as_deref(), Some("bytes=5-"));
    assert_eq!(seen[2], (None, None));

    let up = completing_origin(|_| {
        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops".to_string()
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    piece_0_4(&gw);
    let r = get_h(gw.addr, "/k", "");
    assert_eq!((r.status, r.text().as_str()), (500, "oops"), "{r:?}");
    assert!(!r.has("content-range"), "{r:?}");
    assert!(status_of(&r).contains("fwd-status=500"), "{r:?}");
    assert_eq!(ranges_seen(&up)[1].0.as_deref(), Some("bytes=5-"));
    assert_eq!(up.hits(), 2);
}

/// RFC 9111 §3.4 with coalescing: a request that arrives while the piece is being completed
/// waits on that flight, and gets the whole 200 it stored (no second upstream request, never a
/// 206).
#[test]
fn rfc9111_3_4_a_request_waiting_on_a_completion_gets_the_whole_response() {
    let (arrived, go) = (Event::new(), Event::new());
    let (a2, g2) = (arrived.clone(), go.clone());
    let up = Upstream::start(move |req| {
        let raw: &[u8] = match req.header("range") {
            Some("bytes=0-4") => b"HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\netag: \"a\"\r\ncontent-range: bytes 0-4/10\r\ncontent-length: 5\r\n\r\n01234",
            Some("bytes=5-") => {
                return Reply::Script(vec![
                    Step::Signal(a2.clone()),
                    Step::Await(g2.clone()),
                    Step::Write(b"HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\netag: \"a\"\r\ncontent-range: bytes 5-9/10\r\ncontent-length: 5\r\n\r\n56789".to_vec()),
                ])
            }
            _ => b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 3\r\n\r\nnew",
        };
        Reply::Raw(raw.to_vec())
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    piece_0_4(&gw);
    let addr = gw.addr;
    let leader = std::thread::spawn(move || get_h(addr, "/k", ""));
    assert!(arrived.wait(Duration::from_secs(10)));
    let waiter = std::thread::spawn(move || get_h(addr, "/k", ""));
    // The waiter has joined the flight once its miss is counted (the piece's, the leader's,
    // its own): nothing between the count and the join waits.
    let control = gw.gateway().control();
    let mut joined = false;
    for _ in 0..10_000 {
        let stats = ringway::cache::stats(control, Duration::from_secs(2)).unwrap();
        if stats[0].misses >= 3 {
            joined = true;
            break;
        }
    }
    assert!(joined);
    go.set();
    let r = leader.join().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
    let r = waiter.join().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
    assert!(status_of(&r).contains("collapsed"), "{r:?}");
    assert_eq!(up.hits(), 2);
}

/// An origin that marks every answer fresh for an hour (a blanket `Cache-Control` such as
/// nginx's `add_header ... always`): 412 to a failed `If-Match`, 416 to a `Range` past the
/// end, else 200 "body".
fn blanket_max_age_origin() -> Upstream {
    Upstream::start(|req| {
        let raw: &[u8] = if req.header("if-match").is_some() {
            b"HTTP/1.1 412 Precondition Failed\r\ncache-control: max-age=3600\r\ncontent-length: 0\r\n\r\n"
        } else if req.header("range").is_some() {
            b"HTTP/1.1 416 Range Not Satisfiable\r\ncache-control: max-age=3600\r\ncontent-range: bytes */4\r\ncontent-length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=3600\r\ncontent-length: 4\r\n\r\nbody"
        };
        Reply::Raw(raw.to_vec())
    })
}

/// RFC 9110 §15.5.13, §13.1.1: a 412 says that the request's own precondition failed. Stored
/// under the URL, it answered every later GET there, none of which asked anything (found by
/// tests/fuzz_cache_conn.rs): one client's `If-Match` took the URL down for the others for as
/// long as the origin's `max-age`. Not stored (RFC 9111 §3 allows, never requires, storing).
#[test]
fn rfc9110_15_5_13_a_412_to_a_precondition_is_not_stored_for_others() {
    let up = blanket_max_age_origin();
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let r = get_h(gw.addr, "/p", "If-Match: \"nope\"\r\n");
    assert_eq!(r.status, 412, "{r:?}");
    let r = get(gw.addr, "/p");
    assert_eq!((r.status, r.text().as_str()), (200, "body"), "{r:?}");
    assert_eq!(up.hits(), 2);
}

/// RFC 9110 §15.5.17, §14.2: a 416 says that the request's own `Range` is past the end. Stored
/// under the URL, it answered later GETs without `Range`. Not stored.
#[test]
fn rfc9110_15_5_17_a_416_to_a_range_is_not_stored_for_others() {
    let up = blanket_max_age_origin();
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    let r = get_h(gw.addr, "/r", "Range: bytes=10-20\r\n");
    assert_eq!(r.status, 416, "{r:?}");
    let r = get(gw.addr, "/r");
    assert_eq!((r.status, r.text().as_str()), (200, "body"), "{r:?}");
    assert_eq!(up.hits(), 2);
}

/// RFC 9111 §5.2.1.5: no part of any response to a request with `no-store` is stored. Such a
/// request answered stale under `stale-while-revalidate` started the background
/// revalidation, sent with its own fields (`Cache-Control: no-store` among them), and stored
/// its answer for every other client (found by tests/fuzz_cache_conn.rs). It starts none: the
/// next request without `no-store` does.
#[test]
fn rfc9111_5_2_1_5_a_no_store_request_starts_no_background_revalidation() {
    let (up, _n) = counting_origin("cache-control: max-age=0, stale-while-revalidate=60\r\n");
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/s").text(), "v1");
    let r = get_h(gw.addr, "/s", "Cache-Control: no-store\r\n");
    assert_eq!(r.text(), "v1", "{r:?}");
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    let r = get(gw.addr, "/s");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        up.wait_for(Duration::from_secs(10), |seen| seen.len() >= 2),
        "a revalidation reaches the origin"
    );
    let reval = up.seen.lock().unwrap()[1].clone();
    assert!(
        reval
            .headers_named("cache-control")
            .iter()
            .all(|v| !v.contains("no-store")),
        "the revalidation is the one the plain request started: {:?}",
        reval.headers
    );
}

/// RFC 9111 §5.2.1.5, §4.3.4: a request with `no-store` that validates a stale response gets
/// it with the 304's fields, but the stored response is not freshened by that 304 (it was, and
/// the next request got a hit the origin's 304 to a `no-store` request made fresh).
#[test]
fn rfc9111_5_2_1_5_a_304_to_a_no_store_request_does_not_freshen_the_store() {
    let up = Upstream::start(|req| {
        let raw: &[u8] = if req.header("if-none-match").is_some() {
            b"HTTP/1.1 304 Not Modified\r\ncache-control: max-age=3600\r\netag: \"a\"\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"a\"\r\ncontent-length: 2\r\n\r\nv1"
        };
        Reply::Raw(raw.to_vec())
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/f").text(), "v1");
    let r = get_h(gw.addr, "/f", "Cache-Control: no-store\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    assert_eq!(r.header("cache-control"), Some("max-age=3600"), "{r:?}");
    assert_eq!(up.hits(), 2);
    // Still stale in the store: validated again.
    let r = get(gw.addr, "/f");
    assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{r:?}");
    assert_eq!(up.hits(), 3, "{r:?}");
}

/// RFC 5861 §3, RFC 9110 §9.3.2: a HEAD answered stale under `stale-while-revalidate` from a
/// response without validators started a background revalidation that was the client's own
/// head: a HEAD (with its `Range` and `If-None-Match`), whose answer was then read as a GET's,
/// waiting for a body that never came (`upstream_body`, 30 s by default) while it held the
/// key's flight, and stored nothing. The revalidation is a GET for the whole response.
#[test]
fn rfc5861_3_a_head_starts_a_get_revalidation_without_its_conditionals_or_range() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let body = format!("v{i}");
        let mut raw = format!(
            "HTTP/1.1 200 OK\r\ncache-control: max-age=0, stale-while-revalidate=60\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if req.method != "HEAD" {
            raw.extend_from_slice(body.as_bytes());
        }
        Reply::Raw(raw)
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/h").text(), "v1");
    let r = request(
        gw.addr,
        b"HEAD /h HTTP/1.1\r\nHost: test.local\r\nRange: bytes=0-0\r\nIf-None-Match: \"x\"\r\n\r\n",
    );
    assert!(matches!(r.status, 200 | 206), "{r:?}");
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    assert!(
        up.wait_for(Duration::from_secs(10), |seen| seen.len() >= 2),
        "the revalidation reaches the origin"
    );
    let reval = up.seen.lock().unwrap()[1].clone();
    assert_eq!(
        reval.method,
        "GET",
        "{:?}",
        String::from_utf8_lossy(&reval.raw_head)
    );
    assert_eq!(reval.header("range"), None, "{reval:?}");
    assert_eq!(reval.header("if-none-match"), None, "{reval:?}");
}

/// RFC 6585 §4, §5; RFC 9110 §15.5.1, §15.5.9, §15.5.14, §15.5.18: 400, 408, 413, 417, 429 and
/// 431 answer the request (its syntax, pace, content, `Expect`, header size, its client's rate),
/// not the URL. With an origin's blanket `max-age`, one client's request that drew one of them
/// (here: a header the key does not hold) was stored and answered every later GET there (found
/// by the review of tests/fuzz_cache_conn.rs's findings). Not stored (RFC 9111 §3 allows, never
/// requires, storing): the next GET goes to the origin and gets its 200.
#[test]
fn rfc6585_request_error_statuses_are_not_stored_for_others() {
    let up = Upstream::start(|req| {
        let raw = match req.header("x-status") {
            Some(code) => format!(
                "HTTP/1.1 {code} Refused\r\ncache-control: max-age=3600\r\ncontent-length: 2\r\n\r\nno"
            ),
            None => {
                "HTTP/1.1 200 OK\r\ncache-control: max-age=3600\r\ncontent-length: 4\r\n\r\nbody"
                    .to_string()
            }
        };
        Reply::Raw(raw.into_bytes())
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    for (i, code) in [400u16, 408, 413, 417, 429, 431].into_iter().enumerate() {
        let path = format!("/e{code}");
        let r = get_h(gw.addr, &path, &format!("X-Status: {code}\r\n"));
        assert_eq!(r.status, code, "{r:?}");
        let r = get(gw.addr, &path);
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "body"),
            "{code}: {r:?}"
        );
        assert_eq!(up.hits(), 2 * (i + 1), "{code}");
    }
    // A status that answers the URL (404, RFC 9110 §15.5.5) is still stored.
    let r = get_h(gw.addr, "/n", "X-Status: 404\r\n");
    assert_eq!(r.status, 404, "{r:?}");
    let r = get(gw.addr, "/n");
    assert_eq!((r.status, r.text().as_str()), (404, "no"), "{r:?}");
}

/// RFC 9111 §4.4 with `[cache.redis]` on routes whose key is not the URL as sent (a query
/// allowlist, no query, no host): objects are stored under the keyed URL, and an entry read
/// from Redis (every byte of which is hostile) under a key must name the request's keyed URL.
/// Here `/x?a=1`'s entry is planted under `/y?a=1`'s key: a miss for a gateway that reads it
/// (the origin answers), which still takes the entry under its own key. Before, the URL was
/// compared only where the key is the URL as sent, and the planted entry was served and kept
/// where a purge of `/y?a=1` would not find it.
#[test]
fn rfc9111_4_4_a_redis_entry_naming_another_keyed_url_is_a_miss_on_custom_key_routes() {
    for key in [
        "key = { query = [\"a\"] }",
        "key = { query = \"none\" }",
        "key = { ignore_host = true }",
    ] {
        let redis = RedisServer::start();
        let up = target_origin();
        let global = format!(
            "[cache.redis]\naddress = \"127.0.0.1:{}\"\ntimeout = \"2s\"\nretry_interval = \"100ms\"\n",
            redis.port
        );
        let toml = cache_config(up.addr, key, &global);
        let writer = TestGateway::start(&toml, D);
        assert_eq!(get(writer.addr, "/x?a=1").text(), "/x?a=1", "{key}");
        wait_n_stored_in_redis(&redis, 1);
        let x = redis.keys("ringway:cache:o:*").remove(0);
        assert_eq!(get(writer.addr, "/y?a=1").text(), "/y?a=1", "{key}");
        wait_n_stored_in_redis(&redis, 2);
        let y = redis
            .keys("ringway:cache:o:*")
            .into_iter()
            .find(|k| *k != x)
            .expect("a second entry");
        drop(writer);
        let planted = redis.command(&[
            "EVAL",
            "return redis.call('SET', KEYS[2], redis.call('GET', KEYS[1]))",
            "2",
            &x,
            &y,
        ]);
        assert_eq!(planted.as_deref(), Some("+OK\r\n"), "{key}");
        let reader = TestGateway::start(&toml, D);
        let r = get(reader.addr, "/y?a=1");
        assert_eq!(r.text(), "/y?a=1", "{key}: {r:?}");
        assert!(!status_of(&r).contains("detail=redis"), "{key}: {r:?}");
        assert_eq!(up.hits(), 3, "{key}");
        // The entry under its own key is the keyed URL's: served from Redis.
        let r = get(reader.addr, "/x?a=1");
        assert_eq!(r.text(), "/x?a=1", "{key}: {r:?}");
        assert!(status_of(&r).contains("detail=redis"), "{key}: {r:?}");
        assert_eq!(up.hits(), 3, "{key}");
    }
}

/// RFC 9110 §15.4.5 ("the server ... is sending a 304 ... to a conditional GET or HEAD
/// request"), RFC 9111 §4.3.3 (a cache takes a 304 only as a validation's answer): an origin's
/// 304 to a request the cache sent without `If-None-Match` or `If-Modified-Since` answers
/// nothing that was asked. The client gets the gateway's 502, named as for any invalid
/// response (`detail=upstream-bad-response`), on a kept connection as that 502 is, and nothing
/// is stored: on the usual miss, on a HEAD, and on the fetch of a stale stored response
/// without validators (the client's own head sent). Before, the 304 was relayed to a client
/// that had sent no precondition. A client's own conditional request, sent as it is, still
/// gets the origin's 304.
#[test]
fn rfc9110_15_4_5_a_304_to_a_request_sent_without_a_precondition_is_a_bad_response() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |req| {
        let first = n2.fetch_add(1, Ordering::SeqCst) == 0;
        if first && req.target == "/stale" {
            return Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=1\r\nage: 5\r\ncontent-length: 3\r\n\r\nold"
                    .to_vec(),
            );
        }
        Reply::Raw(
            b"HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\ncache-control: max-age=600\r\n\r\n"
                .to_vec(),
        )
    });
    // An invalid head's 502 on this route: what the 304's must look like.
    let bad =
        Upstream::start(|_| Reply::Raw(b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n".to_vec()));
    let gw = TestGateway::start(&cache_config(bad.addr, "", ""), D);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /b HTTP/1.1\r\nHost: test.local\r\n\r\n");
    let r = c.read_response().expect("an answer");
    assert_eq!(r.status, 502, "{r:?}");
    let keep = r.header("connection").map(str::to_string);
    drop(gw);

    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/stale").text(), "old");
    let mut c = Client::connect(gw.addr);
    for (round, (req, member)) in [
        (
            "GET /m HTTP/1.1\r\nHost: test.local\r\n\r\n",
            "ringway; fwd=uri-miss; detail=upstream-bad-response",
        ),
        (
            "GET /m HTTP/1.1\r\nHost: test.local\r\n\r\n",
            "ringway; fwd=uri-miss; detail=upstream-bad-response",
        ),
        (
            "HEAD /h HTTP/1.1\r\nHost: test.local\r\n\r\n",
            "ringway; fwd=uri-miss; detail=upstream-bad-response",
        ),
        (
            "GET /stale HTTP/1.1\r\nHost: test.local\r\n\r\n",
            "ringway; fwd=stale; detail=upstream-bad-response",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        c.send(req.as_bytes());
        let r = c
            .read_response_for(req.starts_with("HEAD"))
            .expect("an answer on the same connection");
        assert_eq!(r.status, 502, "{round}: {r:?}");
        assert_eq!(status_lines(&r), [member], "{round}: {r:?}");
        assert_eq!(r.header("connection"), keep.as_deref(), "{round}: {r:?}");
        let sent = up.last();
        assert_eq!(sent.header("if-none-match"), None, "{round}");
        assert_eq!(sent.header("if-modified-since"), None, "{round}");
    }
    // Nothing was stored: each went upstream.
    assert_eq!(up.hits(), 5);
    let stats = ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2)).unwrap();
    assert_eq!(stats[0].entries, 1, "{stats:?}");

    // The client's own precondition, forwarded: the 304 answers it.
    for h in [
        "If-None-Match: \"e\"\r\n",
        "If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\n",
    ] {
        let r = get_h(gw.addr, "/c", h);
        assert_eq!(r.status, 304, "{h}: {r:?}");
        assert!(status_of(&r).contains("fwd-status=304"), "{h}: {r:?}");
    }
}

/// RFC 9110 §15.4.5, RFC 9111 §4.3.4, RFC 5861 §3: the background revalidation of a stale
/// response without validators asks for it whole, with no precondition; a 304 to that answers
/// nothing asked and freshens nothing (the copy stays stale, and the next request revalidates
/// it again). Before, a 304 without validators of its own was taken as selecting the copy and
/// freshened it with its `max-age=600`.
#[test]
fn rfc9110_15_4_5_a_304_to_a_background_fetch_without_validators_freshens_nothing() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let up = Upstream::start(move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=0, stale-while-revalidate=600\r\ncontent-length: 3\r\n\r\nold"
                    .to_vec(),
            );
        }
        Reply::Raw(b"HTTP/1.1 304 Not Modified\r\ncache-control: max-age=600\r\n\r\n".to_vec())
    });
    let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
    assert_eq!(get(gw.addr, "/s").text(), "old");
    let r = get(gw.addr, "/s");
    assert_eq!(r.text(), "old", "{r:?}");
    assert!(status_of(&r).contains("stale-while-revalidate"), "{r:?}");
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() >= 2));
    // Until a second revalidation went (the first one's flight ended), every answer is the
    // stale copy: never a fresh hit of a copy the 304 freshened.
    let mut fresh_hit = None;
    assert!(eventually(Duration::from_secs(10), || {
        let r = get(gw.addr, "/s");
        assert_eq!((r.status, r.text().as_str()), (200, "old"), "{r:?}");
        if !status_of(&r).contains("stale-while-revalidate") {
            fresh_hit = Some(r);
            return true;
        }
        up.hits() >= 3
    }));
    assert!(fresh_hit.is_none(), "{fresh_hit:?}");
    let sent = up.last();
    assert_eq!(sent.header("if-none-match"), None);
    assert_eq!(sent.header("if-modified-since"), None);
    let stats = ringway::cache::stats(gw.gateway().control(), Duration::from_secs(2)).unwrap();
    assert_eq!(stats[0].revalidations, 0, "{stats:?}");
}

/// RFC 9112 §6.3 ("a message with both Transfer-Encoding and Content-Length ... ought to be
/// handled as an error"), RFC 9111 §3.4: the answer to the request for a stored piece's rest is
/// the cache's own business, not the client's (who asked for the whole). One with both framing
/// fields is refused as invalid, and one a 304 although the cache asked no question (RFC 9110
/// §15.4.5) answers nothing: either way the whole is fetched without `Range`, as for a 206
/// that is not the rest. Before, the client got a 502 (the 304 was relayed).
#[test]
fn rfc9112_6_3_an_invalid_answer_for_the_rest_of_a_piece_falls_back_to_the_whole() {
    for (i, rest) in [
        "HTTP/1.1 206 Partial Content\r\ncache-control: max-age=60\r\netag: \"a\"\r\ncontent-range: bytes 5-9/10\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nfghij\r\n0\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\netag: \"a\"\r\ncache-control: max-age=60\r\n\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let up = completing_origin(move |_| rest.to_string());
        let gw = TestGateway::start(&cache_config(up.addr, "", ""), D);
        piece_0_4(&gw);
        let r = get_h(gw.addr, "/k", "");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "abcdefghij"),
            "{i}: {r:?}"
        );
        assert!(!r.has("content-range"), "{i}: {r:?}");
        assert!(status_of(&r).contains("fwd=partial;"), "{i}: {r:?}");
        let seen = ranges_seen(&up);
        assert_eq!(seen.len(), 3, "{i}: {seen:?}");
        assert_eq!(seen[1].0.as_deref(), Some("bytes=5-"), "{i}");
        assert_eq!(seen[2], (None, None), "{i}");
        let r = get_h(gw.addr, "/k", "");
        assert_eq!(r.text(), "abcdefghij", "{i}: {r:?}");
        assert!(status_of(&r).starts_with("ringway; hit"), "{i}: {r:?}");
    }
}
