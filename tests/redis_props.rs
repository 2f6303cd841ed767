//! Property tests for the reader of Redis replies (`ringway::redis::decode_reply`, RESP2), used
//! by the Redis link (rate limits, the shared cache) and by the cache's purge log listener.
//! Every byte from Redis is hostile.
//!
//! - Arbitrary bytes (and RESP-like token soup) never panic, and allocate no more than the
//!   bytes given justify.
//! - A reply fed whole, in random pieces or after other replies gives the same frame; every
//!   truncation asks for more and leaves the buffer as it was.
//! - Huge declared lengths allocate nothing up front; deep nesting is refused, not recursed.
//!
//! The default run is small enough for CI (64 cases per property). A longer run:
//! `PROPTEST_CASES=20000 cargo test --release --test redis_props`.

mod prop_support;
mod support;

use std::cell::Cell;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use redis_protocol::resp2::types::{BytesFrame, RangeFrame};

use ringway::cache::fields::Fields;
use ringway::config::DriverChoice;
use ringway::redis::{decode_reply, reply_len};
use support::*;

#[global_allocator]
static GLOBAL: prop_support::ThreadBytes = prop_support::ThreadBytes;

/// What an error of the reader allocates at most (its message).
const ERROR_BYTES: usize = 256;

// ---------------------------------------------------------------------------------------------
// Replies, and their encoding written here from the RESP2 description (not the crate's).

fn frame() -> impl Strategy<Value = BytesFrame> {
    let line = proptest::collection::vec(
        any::<u8>().prop_filter("no CR, LF", |b| *b != b'\r' && *b != b'\n'),
        0..12,
    );
    let leaf = prop_oneof![
        line.clone()
            .prop_map(|v| BytesFrame::SimpleString(Bytes::from(v))),
        "[ -~]{0,16}".prop_map(|s| BytesFrame::Error(s.into())),
        any::<i64>().prop_map(BytesFrame::Integer),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|v| BytesFrame::BulkString(Bytes::from(v))),
        Just(BytesFrame::Null),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        proptest::collection::vec(inner, 0..5).prop_map(BytesFrame::Array)
    })
}

fn encode(f: &BytesFrame, out: &mut Vec<u8>) {
    match f {
        BytesFrame::SimpleString(s) => {
            out.push(b'+');
            out.extend_from_slice(s);
        }
        BytesFrame::Error(e) => {
            out.push(b'-');
            out.extend_from_slice(e.as_bytes());
        }
        BytesFrame::Integer(i) => out.extend_from_slice(format!(":{i}").as_bytes()),
        BytesFrame::BulkString(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
        }
        BytesFrame::Null => out.extend_from_slice(b"$-1"),
        BytesFrame::Array(v) => {
            out.extend_from_slice(format!("*{}\r\n", v.len()).as_bytes());
            for x in v {
                encode(x, out);
            }
            return;
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn wire(f: &BytesFrame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(f, &mut out);
    out
}

/// Frames in a reply, arrays counted too.
fn frames(f: &BytesFrame) -> usize {
    match f {
        BytesFrame::Array(v) => 1 + v.iter().map(frames).sum::<usize>(),
        _ => 1,
    }
}

/// Levels of non-empty arrays in a decoded reply.
fn depth(f: &RangeFrame) -> usize {
    match f {
        RangeFrame::Array(v) if !v.is_empty() => 1 + v.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Frames in a decoded reply, arrays counted too.
fn nodes(f: &RangeFrame) -> usize {
    match f {
        RangeFrame::Array(v) => 1 + v.iter().map(nodes).sum::<usize>(),
        _ => 1,
    }
}

/// RESP-like token soup: mostly well-formed pieces in random order, which reaches deeper into
/// the reader than uniform bytes.
fn soup() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"*".to_vec()),
        Just(b"$".to_vec()),
        Just(b":".to_vec()),
        Just(b"+".to_vec()),
        Just(b"-".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"*1\r\n".to_vec()),
        Just(b"*65535\r\n".to_vec()),
        Just(b"$3\r\nabc\r\n".to_vec()),
        Just(b"9223372036854775807".to_vec()),
        Just(b"99999999999999999999".to_vec()),
        (0u32..40).prop_map(|n| n.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 1..4),
    ];
    proptest::collection::vec(token, 0..40).prop_map(|v| v.concat())
}

/// What one call of the reader says, and what it leaves in the buffer.
#[derive(Debug, PartialEq)]
enum Read {
    More,
    Err,
    Frame(BytesFrame),
}

fn read(buf: &mut BytesMut) -> Read {
    match decode_reply(buf) {
        Ok(None) => Read::More,
        Ok(Some(f)) => Read::Frame(f),
        Err(_) => Read::Err,
    }
}

/// The reader on `input`, with the invariants every answer keeps: nothing taken unless a
/// frame is returned, then exactly `reply_len`; allocation bounded by the input.
fn check(input: &[u8]) -> Read {
    let mut buf = BytesMut::from(input);
    let len = reply_len(input);
    let (r, bytes) = prop_support::allocated_by(|| read(&mut buf));
    // A decoded frame holds at most a few words per input byte (arrays of frames); a refusal
    // or a short buffer allocates next to nothing.
    let bound = 1024 + 64 * input.len();
    assert!(
        bytes <= bound,
        "{bytes} bytes allocated for {} input bytes",
        input.len()
    );
    match &r {
        Read::Frame(_) => {
            let n = len.expect("decoded").expect("whole");
            assert_eq!(&buf[..], &input[n..], "exactly the reply is taken");
        }
        Read::More => {
            assert!(matches!(len, Ok(None)));
            assert_eq!(&buf[..], input, "nothing taken while a reply is not whole");
        }
        Read::Err => {}
    }
    r
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        check(&input);
    }

    #[test]
    fn token_soup_never_panics(input in soup()) {
        check(&input);
    }

    /// Against the crate's own decoder on the same bytes: a reply it decodes within the limits
    /// has the length `reply_len` finds; one past them is refused; bytes it refuses or finds
    /// short are never a reply to `reply_len`.
    #[test]
    fn reply_len_agrees_with_the_decoder_within_the_limits(input in soup()) {
        use redis_protocol::resp2::decode::decode_range;
        let ours = reply_len(&input);
        match decode_range(&input) {
            Ok(Some((f, amt))) => {
                if depth(&f) <= 8 && nodes(&f) <= 4096 {
                    prop_assert_eq!(ours.ok(), Some(Some(amt)));
                } else {
                    prop_assert!(ours.is_err());
                }
            }
            Ok(None) | Err(_) => prop_assert!(!matches!(ours, Ok(Some(_)))),
        }
    }

    /// A reply is read back as written, leaving what follows it; every prefix asks for more.
    #[test]
    fn replies_round_trip_and_every_prefix_needs_more(
        f in frame(),
        tail in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let w = wire(&f);
        let mut input = w.clone();
        input.extend_from_slice(&tail);
        let mut buf = BytesMut::from(&input[..]);
        prop_assert_eq!(read(&mut buf), Read::Frame(f.clone()));
        prop_assert_eq!(&buf[..], &tail[..]);
        for n in 0..w.len() {
            prop_assert_eq!(check(&w[..n]), Read::More, "prefix {}", n);
        }
        prop_assert!(frames(&f) <= 4096);
    }

    /// Bytes arriving in arbitrary pieces give the same replies, in order, as the bytes whole
    /// (a pipeline's answers as the link reads them).
    #[test]
    fn split_anywhere_is_the_same(
        fs in proptest::collection::vec(frame(), 1..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let input: Vec<u8> = fs.iter().flat_map(wire).collect();
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
        at.push(input.len());
        at.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in at {
            buf.extend_from_slice(&input[from..to]);
            from = to;
            loop {
                match read(&mut buf) {
                    Read::Frame(f) => got.push(f),
                    Read::More => break,
                    Read::Err => prop_assert!(false, "a valid pipeline refused"),
                }
            }
        }
        prop_assert_eq!(got, fs);
        prop_assert!(buf.is_empty());
    }

    /// A declared length far beyond the bytes present reserves nothing: a bulk string waits
    /// for its bytes (up to the largest reply) or is refused, an array longer than a reply may
    /// hold is refused.
    #[test]
    fn huge_declared_lengths_allocate_nothing_up_front(
        n in prop_oneof![4_096u64..u64::MAX, Just(i64::MAX as u64), (1u64 << 30)..(1u64 << 31)],
        kind in prop_oneof![Just(b'$'), Just(b'*')],
        depth in 0usize..4,
        body in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut input = b"*1\r\n".repeat(depth);
        input.push(kind);
        input.extend_from_slice(n.to_string().as_bytes());
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(&body);
        let mut buf = BytesMut::from(&input[..]);
        let (r, bytes) = prop_support::allocated_by(|| read(&mut buf));
        // Waiting allocates nothing; a refusal, only its error.
        prop_assert!(bytes <= ERROR_BYTES, "{} bytes allocated", bytes);
        if r == Read::More {
            prop_assert_eq!(bytes, 0);
        }
        match kind {
            b'$' if n <= (1 << 30) + (1 << 20) => prop_assert_eq!(r, Read::More),
            _ => prop_assert_eq!(r, Read::Err),
        }
    }
}

/// An origin whose answers (`origin`) may not be stored: what a request served from Redis
/// would otherwise have got.
fn no_store_origin() -> Upstream {
    Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 6\r\n\r\norigin"
                .to_vec(),
        )
    })
}

/// One cached route to `up`, the shared layer at `redis` with the given `timeout`.
fn redis_cache_config(up: SocketAddr, redis: SocketAddr, timeout: &str) -> String {
    config(
        &[up],
        &format!(
            "[cache.redis]\naddress = \"{redis}\"\ntimeout = \"{timeout}\"\nretry_interval = \"100ms\"\n\n\
             [[routes]]\nupstream = \"up\"\ncache = {{ }}\n"
        ),
    )
}

/// A stored 200 from Redis for `url`, with `body`, fresh for 600 s from now.
fn entry(url: Bytes, body: Bytes) -> ringway::cache::Object {
    ringway::cache::Object {
        status: 200,
        reason: Bytes::from_static(b"OK"),
        fields: Fields::default(),
        body,
        t: ringway::cache::Timing {
            response_time: support::now(),
            lifetime: 600,
            ..Default::default()
        },
        url,
        tags: Vec::new(),
        vary: Vec::new(),
        invalid: Cell::new(false),
        born: Cell::new(0),
    }
}

/// What Redis answers a GET of `entry`'s key with: the entry as ringway encodes it, as a bulk
/// string.
fn entry_reply(entry: &ringway::cache::Object) -> Vec<u8> {
    let enc = ringway::cache::redis::encode(entry);
    let mut reply = format!("${}\r\n", enc.len()).into_bytes();
    reply.extend_from_slice(&enc);
    reply.extend_from_slice(b"\r\n");
    reply
}

/// `*1\r\n` repeated: the crate's decoder recurses once per level, so 100 000 levels (400 KB,
/// well under the largest reply) overflowed the Redis thread's stack, which aborts the
/// process. Refused now, whole or not, past `MAX_REPLY_DEPTH` (8) levels.
#[test]
fn deeply_nested_arrays_are_refused_not_recursed() {
    let deep = |levels: usize| {
        let mut b = b"*1\r\n".repeat(levels);
        b.extend_from_slice(b":1\r\n");
        b
    };
    for levels in [9, 100, 100_000] {
        let mut buf = BytesMut::from(&deep(levels)[..]);
        assert!(decode_reply(&mut buf).is_err(), "{levels} levels");
        let mut buf = BytesMut::from(&deep(levels)[..levels * 4]);
        assert!(
            decode_reply(&mut buf).is_err(),
            "{levels} levels, not whole"
        );
    }
    let mut buf = BytesMut::from(&deep(8)[..]);
    let mut want = BytesFrame::Integer(1);
    for _ in 0..8 {
        want = BytesFrame::Array(vec![want]);
    }
    assert_eq!(decode_reply(&mut buf).unwrap(), Some(want));
}

/// `*65535\r\n` repeated: the crate's decoder reserved 64 KiB for each array before reading
/// its elements, 640 KiB for ten levels of 80 bytes. Refused now: more frames than a reply
/// may hold.
#[test]
fn long_arrays_reserve_nothing() {
    let input = b"*65535\r\n".repeat(10);
    let mut buf = BytesMut::from(&input[..]);
    let (r, bytes) = prop_support::allocated_by(|| decode_reply(&mut buf));
    assert!(r.is_err());
    assert!(bytes <= ERROR_BYTES, "{bytes} bytes allocated");
    // Within the limits, an array that is not whole reserves nothing either.
    let mut buf = BytesMut::from(&b"*4000\r\n*4000\r\n:1\r\n"[..]);
    let (r, bytes) = prop_support::allocated_by(|| decode_reply(&mut buf));
    assert!(matches!(r, Ok(None)));
    assert_eq!(bytes, 0);
}

/// A line without its CR LF is waited for up to `MAX_REPLY_LINE` (16 KiB), then refused: a
/// server that never ends a line does not make the link buffer up to the largest reply,
/// re-reading the line at every read.
#[test]
fn endless_lines_are_refused() {
    for kind in [b'+', b'-', b':', b'$', b'*'] {
        let mut input = vec![kind];
        input.extend(std::iter::repeat_n(b'7', 16 * 1024));
        let mut buf = BytesMut::from(&input[..]);
        assert!(matches!(decode_reply(&mut buf), Ok(None)));
        input.extend_from_slice(b"77");
        let mut buf = BytesMut::from(&input[..]);
        assert!(decode_reply(&mut buf).is_err(), "{}", kind as char);
    }
    // A 16 KiB simple string is still a reply.
    let mut input = b"+".to_vec();
    input.extend(std::iter::repeat_n(b'a', 16 * 1024));
    input.extend_from_slice(b"\r\n");
    let mut buf = BytesMut::from(&input[..]);
    assert!(matches!(
        decode_reply(&mut buf),
        Ok(Some(BytesFrame::SimpleString(_)))
    ));
}

// ---------------------------------------------------------------------------------------------
// A whole link: a gateway whose `[cache.redis]` is a hostile server.

/// A fake Redis on loopback: it answers the link's handshake (`SCRIPT LOAD`), every `GET`
/// with `reply`, anything else with `+OK`, and counts the `GET`s.
fn fake_redis(reply: Vec<u8>) -> (ServerThreads, SocketAddr, Arc<AtomicUsize>) {
    fake_redis_with(reply, |_| b"+OK\r\n".to_vec())
}

/// [`fake_redis`] that answers the `n`th `EVALSHA` (from 0) with `evalsha(n)`.
fn fake_redis_with(
    reply: Vec<u8>,
    evalsha: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
) -> (ServerThreads, SocketAddr, Arc<AtomicUsize>) {
    fake_redis_answering(move |_| reply.clone(), evalsha)
}

/// [`fake_redis`] that answers the `n`th `GET` (from 0) with `get(n)` and the `n`th `EVALSHA`
/// with `evalsha(n)`.
fn fake_redis_answering(
    get: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
    evalsha: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
) -> (ServerThreads, SocketAddr, Arc<AtomicUsize>) {
    fake_redis_scripted(get, evalsha, || {
        format!("$40\r\n{}\r\n", "0".repeat(40)).into_bytes()
    })
}

/// [`fake_redis_answering`] that answers `SCRIPT` with `script()`.
fn fake_redis_scripted(
    get: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
    evalsha: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
    script: impl Fn() -> Vec<u8> + Send + Sync + 'static,
) -> (ServerThreads, SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let gets = Arc::new(AtomicUsize::new(0));
    let g = gets.clone();
    let e = Arc::new(AtomicUsize::new(0));
    let t = serve_commands(l, None, move |args, s| {
        let out = match args.first() {
            Some(BytesFrame::BulkString(c)) if c.eq_ignore_ascii_case(b"SCRIPT") => script(),
            Some(BytesFrame::BulkString(c)) if c.eq_ignore_ascii_case(b"GET") => {
                get(g.fetch_add(1, Ordering::SeqCst))
            }
            Some(BytesFrame::BulkString(c)) if c.eq_ignore_ascii_case(b"EVALSHA") => {
                evalsha(e.fetch_add(1, Ordering::SeqCst))
            }
            _ => b"+OK\r\n".to_vec(),
        };
        s.write_all(&out).is_ok()
    });
    (t, addr, gets)
}

/// A fake Redis on `l`: each command (a RESP array, read as the reader under test reads
/// replies) goes to `answer`, which writes its reply to the connection and says whether to go
/// on (`false` ends the connection). Reads wait at most 5 s, writes `write_timeout` (none:
/// forever).
fn serve_commands(
    l: TcpListener,
    write_timeout: Option<Duration>,
    answer: impl Fn(&[BytesFrame], &mut TcpStream) -> bool + Send + Sync + 'static,
) -> ServerThreads {
    ServerThreads::serve(l, move |mut s, stop| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(write_timeout);
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        while !stop.is_set() {
            match decode_reply(&mut buf) {
                Ok(Some(BytesFrame::Array(args))) => {
                    if !answer(&args, &mut s) {
                        return;
                    }
                }
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
            }
        }
    })
}

/// A rate-limit grant is never more than the host asked for: a server that answers one
/// demand with 99 999 999 999 tokens (then runs dry) gives this host the batch it asked for
/// (one token here), not an unbounded stock; before, the host kept 2^32 - 1 tokens and
/// admitted every request after.
#[test]
fn a_rate_limit_grant_from_redis_is_never_more_than_asked() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let (mut fake, addr, _) = fake_redis_with(Vec::new(), |n| {
        if n == 0 {
            b"*2\r\n:99999999999\r\n:0\r\n".to_vec()
        } else {
            b"*2\r\n:0\r\n:0\r\n".to_vec()
        }
    });
    let toml = config(
        &[up.addr],
        &format!(
            "[server]\nworkers = 1\n[rate_limiting]\nbackend = \"redis\"\n\
             [rate_limiting.redis]\naddress = \"{addr}\"\ntimeout = \"500ms\"\non_failure = \"deny\"\n\n\
             [[routes]]\nupstream = \"up\"\nrate_limits = [{{ key = \"route\", rate = 1, per = \"1m\" }}]\n"
        ),
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    assert_eq!(get(gw.addr, "/").status, 200);
    let statuses: Vec<u16> = (0..5).map(|_| get(gw.addr, "/").status).collect();
    assert!(statuses.iter().all(|s| *s == 429), "{statuses:?}");
    drop(gw);
    fake.stop();
}

/// Replies that a Redis link must refuse without dying: `*1\r\n` 100 000 times overflowed
/// the stack of the link's thread before its depth was checked (the process aborted), and an
/// array of 65 535 elements nested ten deep made the decoder reserve 640 KiB. The cache fails
/// open: every request is answered by the origin, and the gateway lives on.
#[test]
fn hostile_redis_replies_fail_open_and_the_gateway_lives() {
    let up = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        )
    });
    for reply in [b"*1\r\n".repeat(100_000), b"*65535\r\n".repeat(10)] {
        let (mut fake, addr, gets) = fake_redis(reply);
        let toml = redis_cache_config(up.addr, addr, "200ms");
        let gw = TestGateway::start(&toml, DriverChoice::Auto);
        for i in 0..3 {
            let r = get(gw.addr, &format!("/p{i}"));
            assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
        }
        assert!(
            eventually(Duration::from_secs(5), || gets.load(Ordering::SeqCst) >= 1),
            "the gateway asked Redis"
        );
        // Still alive, and still answering.
        assert_eq!(get(gw.addr, "/p0").status, 200);
        drop(gw);
        fake.stop();
    }
}

/// An entry whose age is far past 2^31 (its corrected initial age is any u64 to a hostile
/// Redis): answered fresh, with `Age: 2147483648` (RFC 9111 §1.2.2), not the u64 it adds up to
/// (`Age: 1099511627777` before), and a `Cache-Status` ttl of 15 digits at most (it was
/// `ttl=9223372036854775807`, which no Structured Fields parser accepts).
#[test]
fn an_entry_from_redis_with_a_huge_age_is_sent_with_age_2_31() {
    let now = support::now();
    let entry = ringway::cache::Object {
        fields: Fields::from_pairs([(&b"content-type"[..], &b"text/plain"[..])]).expect("fits"),
        t: ringway::cache::Timing {
            response_time: now,
            initial_age: 1 << 40,
            lifetime: u64::MAX,
            ..Default::default()
        },
        ..entry(
            Bytes::from_static(b"test.local/old"),
            Bytes::from_static(b"from redis"),
        )
    };
    let reply = entry_reply(&entry);
    let (mut fake, addr, gets) = fake_redis(reply);
    let up =
        Upstream::start(|_| Reply::Raw(b"HTTP/1.1 500 No\r\ncontent-length: 0\r\n\r\n".to_vec()));
    let toml = redis_cache_config(up.addr, addr, "2s");
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let r = get(gw.addr, "/old");
    assert_eq!((r.status, &r.body[..]), (200, &b"from redis"[..]), "{r:?}");
    assert_eq!(r.header("age"), Some("2147483648"), "{r:?}");
    // And a `ttl` that is an sf-integer (RFC 9211 §2.5, RFC 8941 §3.3.1: 15 digits at most).
    let status = r.header("cache-status").unwrap_or("");
    assert!(status.contains("; ttl=999999999999999;"), "{status}");
    assert!(gets.load(Ordering::SeqCst) >= 1);
    assert_eq!(up.hits(), 0);
    drop(gw);
    fake.stop();
}

/// An entry carrying framing or hop-by-hop fields (which ringway never stores, RFC 9111 §3.1)
/// is refused as a miss: its `Content-Length: 100` was sent beside the gateway's own
/// `content-length: 10`, and a `Transfer-Encoding: chunked` above it, so that the client read
/// the entry's body (and the next response) by the entry's framing.
#[test]
fn an_entry_from_redis_with_framing_fields_is_a_miss() {
    let up = no_store_origin();
    for (name, value) in [
        ("content-length", "100"),
        ("transfer-encoding", "chunked"),
        ("connection", "close"),
        ("age", "5"),
    ] {
        let entry = ringway::cache::Object {
            fields: Fields::from_pairs([(name.as_bytes(), value.as_bytes())]).expect("fits"),
            ..entry(
                Bytes::from_static(b"test.local/f"),
                Bytes::from_static(b"from redis"),
            )
        };
        let reply = entry_reply(&entry);
        let (mut fake, addr, gets) = fake_redis(reply);
        let toml = redis_cache_config(up.addr, addr, "2s");
        let gw = TestGateway::start(&toml, DriverChoice::Auto);
        let mut c = Client::connect(gw.addr);
        for _ in 0..2 {
            c.send(b"GET /f HTTP/1.1\r\nHost: test.local\r\n\r\n");
            let r = c.read_response().expect("an answer");
            assert_eq!(
                (r.status, &r.body[..]),
                (200, &b"origin"[..]),
                "{name}: {r:?}"
            );
            let from_entry = |(n, v): &(String, String)| n.eq_ignore_ascii_case(name) && v == value;
            assert!(!r.headers.iter().any(from_entry), "{name}: {r:?}");
        }
        assert!(gets.load(Ordering::SeqCst) >= 1);
        drop(gw);
        fake.stop();
    }
}

/// An entry longer than this host takes (`max_entry_bytes` and the encoding's overhead), as
/// another host with a larger `max_entry_bytes` writes, is a miss, read and thrown away as it
/// arrives, and the link stays up and in step: the next lookup, on the same connection, finds
/// its entry. Before, the link was dropped as soon as the length was read and marked down for
/// `retry_interval`, so the next lookup was a miss too (and before that, an entry up to 8 MiB
/// long was read and held whole).
#[test]
fn a_longer_entry_another_host_wrote_is_a_miss_and_the_link_stays_up() {
    let big = entry_reply(&entry(
        Bytes::from_static(b"test.local/big"),
        Bytes::from(vec![b'r'; 64 * 1024]),
    ));
    let small = entry_reply(&entry(
        Bytes::from_static(b"test.local/small"),
        Bytes::from(vec![b's'; 1024]),
    ));
    let (mut fake, addr, gets) = fake_redis_answering(
        move |n| if n == 0 { big.clone() } else { small.clone() },
        |_| b"-ERR no scripts here\r\n".to_vec(),
    );
    let up = no_store_origin();
    let toml = config(
        &[up.addr],
        &format!(
            "[cache.redis]\naddress = \"{addr}\"\ntimeout = \"2s\"\nretry_interval = \"10s\"\n\
             max_entry_bytes = \"2KiB\"\n\n[[routes]]\nupstream = \"up\"\ncache = {{ }}\n"
        ),
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let r = get(gw.addr, "/big");
    assert_eq!((r.status, &r.body[..]), (200, &b"origin"[..]), "{r:?}");
    let r = get(gw.addr, "/small");
    assert_eq!(r.status, 200);
    assert!(
        r.body == vec![b's'; 1024],
        "/small is not found in Redis: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(gets.load(Ordering::SeqCst), 2);
    // The link's connection and the purge log listener's, each opened once.
    assert_eq!(fake.accepted(), 2, "the link was dropped");
    drop(gw);
    fake.stop();
}

/// RFC 9111 §4.4: a Redis lookup sent before a POST invalidated its URL, answered after, does
/// not put its pre-POST entry into the worker's store (review r12a M3: before, the entry was
/// stored as if newer than the invalidation, and every GET after the POST was a hit with the
/// old body, though Redis had deleted it).
#[test]
fn rfc9111_4_4_a_redis_answer_to_a_lookup_sent_before_an_invalidation_is_not_stored() {
    let old = entry_reply(&entry(
        Bytes::from_static(b"test.local/m"),
        Bytes::from_static(b"pre-post"),
    ));
    let (arrived, gate) = (Event::new(), Event::new());
    let (a2, g2) = (arrived.clone(), gate.clone());
    // The first lookup is answered with the old entry once the POST is through; later ones
    // find nothing (the POST's deletion).
    let (mut fake, addr, _) = fake_redis_answering(
        move |n| {
            if n > 0 {
                return b"$-1\r\n".to_vec();
            }
            a2.set();
            g2.wait(Duration::from_secs(10));
            old.clone()
        },
        |_| b"+OK\r\n".to_vec(),
    );
    let up = no_store_origin();
    let gw = TestGateway::start(&redis_cache_config(up.addr, addr, "5s"), DriverChoice::Auto);
    let at = gw.addr;
    let first = std::thread::spawn(move || get(at, "/m").status);
    assert!(arrived.wait(Duration::from_secs(10)), "the lookup is out");
    let r = request(
        gw.addr,
        b"POST /m HTTP/1.1\r\nHost: test.local\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    gate.set();
    assert_eq!(first.join().unwrap(), 200);
    let r = get(gw.addr, "/m");
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        (200, "origin".to_string()),
        "{r:?}"
    );
    drop(gw);
    fake.stop();
}

/// A Redis reply nobody asked for is never taken as the answer to the next command (RESP2
/// answers are matched to commands by their order alone): a server that answers one `GET`
/// with a miss and then with eight entries of another URL made every lookup after it take
/// one of those, so that `/c`, `/d` and `/e` were answered with `/x`'s body. The link is now
/// dropped as soon as it holds bytes beyond the answers of its round.
#[test]
fn a_reply_nobody_asked_for_is_not_the_answer_to_the_next_command() {
    let poison = {
        let entry = entry(
            Bytes::from_static(b"test.local/x"),
            Bytes::from_static(b"poison"),
        );
        entry_reply(&entry)
    };
    let (mut fake, addr, gets) = fake_redis_answering(
        move |n| {
            let mut r = b"$-1\r\n".to_vec();
            if n == 0 {
                r.extend_from_slice(&poison.repeat(8));
            }
            r
        },
        |_| b"-ERR no scripts here\r\n".to_vec(),
    );
    let up = no_store_origin();
    let toml = redis_cache_config(up.addr, addr, "2s");
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    for p in ["/a", "/c", "/d", "/e"] {
        let r = get(gw.addr, p);
        assert_eq!((r.status, &r.body[..]), (200, &b"origin"[..]), "{p}: {r:?}");
    }
    assert!(gets.load(Ordering::SeqCst) >= 1);
    drop(gw);
    fake.stop();
}

/// An entry received, it says, three years from now is a miss (RFC 9111 §4.2.3: its age is
/// the time since it was received, which cannot be negative): taken as it was, its age stood
/// still at its initial age until that time, so a 60-second lifetime kept it fresh, with
/// `Age: 0`, for three years.
#[test]
fn rfc9111_4_2_3_an_entry_from_redis_received_in_the_future_is_a_miss() {
    let entry = ringway::cache::Object {
        t: ringway::cache::Timing {
            response_time: support::now() + 100_000_000,
            lifetime: 60,
            ..Default::default()
        },
        ..entry(
            Bytes::from_static(b"test.local/future"),
            Bytes::from_static(b"from redis"),
        )
    };
    let reply = entry_reply(&entry);
    let (mut fake, addr, gets) = fake_redis(reply);
    let up = no_store_origin();
    let toml = redis_cache_config(up.addr, addr, "2s");
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let r = get(gw.addr, "/future");
    assert_eq!((r.status, &r.body[..]), (200, &b"origin"[..]), "{r:?}");
    assert!(gets.load(Ordering::SeqCst) >= 1);
    drop(gw);
    fake.stop();
}

/// The cache link reads no bulk string declared longer than any host writes (an entry of the
/// largest `max_entry_bytes`, 1 GiB, with its framing: 1 GiB and 1 MiB): it is refused as soon
/// as its length is read, and the link closed, rather than read (and thrown away) for as long
/// as the server sends. One declared within that bound but longer than this host takes is
/// read and thrown away (see above).
#[test]
fn the_cache_link_reads_no_bulk_string_longer_than_any_host_writes() {
    for declared in [(1u64 << 30) + (1 << 20) + 1, 1 << 62] {
        a_declared_length_is_refused_before_its_string(declared);
    }
}

fn a_declared_length_is_refused_before_its_string(declared: u64) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    // Whether the whole string was taken by the gateway (written with no error).
    let taken = Arc::new(AtomicUsize::new(0));
    let t = taken.clone();
    let mut fake = serve_commands(l, Some(Duration::from_secs(20)), move |args, s| {
        let get = matches!(args.first(),
            Some(BytesFrame::BulkString(c)) if c.eq_ignore_ascii_case(b"GET"));
        let script = matches!(args.first(),
            Some(BytesFrame::BulkString(c)) if c.eq_ignore_ascii_case(b"SCRIPT"));
        let answer = if script {
            format!("$40\r\n{}\r\n", "0".repeat(40)).into_bytes()
        } else if get {
            let mut a = format!("${declared}\r\n").into_bytes();
            a.resize(a.len() + (48 << 20), b'r');
            a
        } else {
            b"+OK\r\n".to_vec()
        };
        if s.write_all(&answer).is_err() {
            return false;
        }
        if get {
            t.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        true
    });
    let up = no_store_origin();
    let toml = redis_cache_config(up.addr, addr, "30s");
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let r = get(gw.addr, "/big");
    assert_eq!((r.status, &r.body[..]), (200, &b"origin"[..]), "{r:?}");
    assert_eq!(
        taken.load(Ordering::SeqCst),
        0,
        "the link read 48 MiB of a reply declared {declared} bytes long"
    );
    drop(gw);
    fake.stop();
}

/// What Redis says is left of a limit is never taken as more than the limit holds: a server
/// that answers each demand with 5 tokens and 99 999 999 999 left made every response carry
/// `RateLimit: "route";r=99999999999` for a limit of 10 (the RateLimit fields' `r`, the
/// remaining quota units, is at most the policy's `q`; draft-ietf-httpapi-ratelimit-headers).
#[test]
fn ratelimit_remaining_from_redis_is_never_more_than_the_limit() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let (mut fake, addr, _) =
        fake_redis_with(Vec::new(), |_| b"*2\r\n:5\r\n:99999999999\r\n".to_vec());
    let toml = config(
        &[up.addr],
        &format!(
            "[server]\nworkers = 1\n[rate_limiting]\nbackend = \"redis\"\n\
             [rate_limiting.redis]\naddress = \"{addr}\"\ntimeout = \"2s\"\non_failure = \"deny\"\n\n\
             [[routes]]\nupstream = \"up\"\n\
             rate_limits = [{{ key = \"route\", rate = 10, per = \"1s\", burst = 10 }}]\n"
        ),
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    for _ in 0..3 {
        let r = get(gw.addr, "/");
        assert_eq!(r.status, 200, "{r:?}");
        let field = r.header("ratelimit").unwrap_or("").to_string();
        let remaining: u64 = field
            .split(';')
            .find_map(|p| p.strip_prefix("r="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(remaining <= 10, "{field}");
    }
    drop(gw);
    fake.stop();
}

/// An entry whose field values or reason phrase hold control bytes (other than HTAB) is a
/// miss (RFC 9110 §5.5 field values, RFC 9112 §4 reason-phrase; the parser of upstream
/// responses never lets one through, so ringway never writes one): before, only CR, LF and
/// NUL were refused, and a value with a vertical tab, an escape or a DEL, or a reason with a
/// control byte, was sent to the client as it was.
#[test]
fn rfc9110_5_5_an_entry_from_redis_with_control_bytes_in_a_field_is_a_miss() {
    let up = no_store_origin();
    for (value, reason) in [
        (&b"a\x0bb"[..], &b"OK"[..]),
        (b"a\x1b[2Jb", b"OK"),
        (b"a\x7fb", b"OK"),
        (b"fine", b"O\x01K"),
    ] {
        let entry = ringway::cache::Object {
            reason: Bytes::copy_from_slice(reason),
            fields: Fields::from_pairs([(&b"x-v"[..], value)]).expect("fits"),
            ..entry(
                Bytes::from_static(b"test.local/c"),
                Bytes::from_static(b"from redis"),
            )
        };
        let reply = entry_reply(&entry);
        let (mut fake, addr, gets) = fake_redis(reply);
        let toml = redis_cache_config(up.addr, addr, "2s");
        let gw = TestGateway::start(&toml, DriverChoice::Auto);
        let r = get(gw.addr, "/c");
        assert_eq!(
            (r.status, &r.body[..]),
            (200, &b"origin"[..]),
            "{value:?} {reason:?}: {r:?}"
        );
        assert!(gets.load(Ordering::SeqCst) >= 1);
        drop(gw);
        fake.stop();
    }
}

/// An entry found under a URL's key but naming another URL is a miss where the key is the
/// URL as it is (RFC 9111 §4.4: a purge finds stored responses by URL): before, it was served
/// and kept in the worker's store, where a purge of the request's URL did not find it (a
/// probe: `purged: 0`, and the planted body served on).
#[test]
fn rfc9111_4_4_an_entry_from_redis_naming_another_url_is_a_miss() {
    let entry = entry(
        Bytes::from_static(b"test.local/other"),
        Bytes::from_static(b"from redis"),
    );
    let reply = entry_reply(&entry);
    let (mut fake, addr, gets) = fake_redis(reply);
    let up = no_store_origin();
    let toml = redis_cache_config(up.addr, addr, "2s");
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let r = get(gw.addr, "/lie");
    assert_eq!((r.status, &r.body[..]), (200, &b"origin"[..]), "{r:?}");
    // The same entry under its own URL is used.
    let r = get(gw.addr, "/other");
    assert_eq!((r.status, &r.body[..]), (200, &b"from redis"[..]), "{r:?}");
    assert!(gets.load(Ordering::SeqCst) >= 2);
    drop(gw);
    fake.stop();
}

/// The cache's link loads no script (it sends its own with `EVAL`): a Redis whose ACL denies
/// it `SCRIPT` serves the cache all the same. Before, every connection of the cache's link
/// began with the rate limiter's two `SCRIPT LOAD`s, and a refusal kept the link down: every
/// lookup a miss.
#[test]
fn the_cache_link_needs_no_script_command() {
    let entry = entry(
        Bytes::from_static(b"test.local/s"),
        Bytes::from_static(b"from redis"),
    );
    let reply = entry_reply(&entry);
    let (mut fake, addr, _) = fake_redis_scripted(
        move |_| reply.clone(),
        |_| b"-NOPERM\r\n".to_vec(),
        || b"-NOPERM this user has no permissions to run the 'script|load' command\r\n".to_vec(),
    );
    let up = no_store_origin();
    let toml = redis_cache_config(up.addr, addr, "2s");
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let r = get(gw.addr, "/s");
    assert_eq!((r.status, &r.body[..]), (200, &b"from redis"[..]), "{r:?}");
    assert_eq!(up.hits(), 0);
    drop(gw);
    fake.stop();
}

/// RFC 9211 §2: members of `Cache-Status` bearing this cache's name are this cache's to
/// write. An entry read from Redis (a hostile server, or a peer that writes there) with such
/// members has them dropped as it is loaded, as an upstream's are before they are stored:
/// before, `ringway; hit; ttl=99999` from the entry was replayed before the gateway's own
/// member on the answer from Redis and on every local hit after it. Another cache's members
/// (`Ringway` is another name) stay, in order; a line left empty goes.
#[test]
fn rfc9211_2_an_entry_from_redis_bearing_this_cache_s_name_has_those_members_dropped() {
    let entry = ringway::cache::Object {
        fields: Fields::from_pairs([
            (
                &b"cache-status"[..],
                &b"ringway; hit; ttl=99999, upstream-cdn; hit"[..],
            ),
            (&b"Cache-Status"[..], &b"\"ringway\"; fwd=uri-miss"[..]),
            (&b"cache-status"[..], &b"Ringway; hit"[..]),
            (&b"content-type"[..], &b"text/plain"[..]),
        ])
        .expect("fits"),
        ..entry(
            Bytes::from_static(b"test.local/cs"),
            Bytes::from_static(b"from redis"),
        )
    };
    let reply = entry_reply(&entry);
    let (mut fake, addr, gets) = fake_redis(reply);
    let up = no_store_origin();
    let toml = redis_cache_config(up.addr, addr, "2s");
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let mut c = Client::connect(gw.addr);
    // From Redis, then from the worker's store.
    for round in 0..2 {
        c.send(b"GET /cs HTTP/1.1\r\nHost: test.local\r\n\r\n");
        let r = c.read_response().expect("an answer");
        assert_eq!((r.status, &r.body[..]), (200, &b"from redis"[..]), "{r:?}");
        assert_eq!(r.header("content-type"), Some("text/plain"), "{r:?}");
        let members: Vec<String> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cache-status"))
            .flat_map(|(_, v)| v.split(',').map(|m| m.trim().to_string()))
            .collect();
        let named = |m: &String| {
            let name = m.split(';').next().unwrap_or("");
            name == "ringway" || name == "\"ringway\""
        };
        assert_eq!(
            members.iter().filter(|m| named(m)).count(),
            1,
            "round {round}: {members:?}"
        );
        assert_eq!(members.len(), 3, "round {round}: {members:?}");
        assert_eq!(members[0], "upstream-cdn; hit", "round {round}");
        assert_eq!(members[1], "Ringway; hit", "round {round}");
        assert!(
            members[2].starts_with("ringway; hit"),
            "round {round}: {members:?}"
        );
        assert!(!members[2].contains("99999"), "round {round}: {members:?}");
    }
    assert_eq!(gets.load(Ordering::SeqCst), 1);
    assert_eq!(up.hits(), 0);
    drop(gw);
    fake.stop();
}

/// RFC 9111 §4.4 with `[cache.redis]`: a purge deletes the Redis copies after the workers
/// applied it, and a worker's lookup in Redis sent in between must not take back a copy the
/// purge covers. A purge by prefix deletes once a `SCAN` round trip has named the keys, so a
/// lookup sent after the purge was applied here can reach Redis first. This fake Redis keeps
/// the order one connection has in Redis (commands answered in turn; an entry deleted only by
/// the purge's `EVAL`), and widens that window: it answers the `SCAN` once the lookup has been
/// sent (the gateway's `ringway_cache_redis_lookups_total` grew). Before, the worker stored the
/// purged copy again and served it.
#[test]
fn rfc9111_4_4_a_redis_lookup_sent_before_the_purge_s_deletion_does_not_bring_back_the_copy() {
    use std::sync::atomic::AtomicBool;
    let reply = entry_reply(&entry(
        Bytes::from_static(b"test.local/p/x"),
        Bytes::from_static(b"old"),
    ));
    let deleted = Arc::new(AtomicBool::new(false));
    let go = Event::new();
    let (d, g) = (deleted.clone(), go.clone());
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let mut fake = serve_commands(l, None, move |args, s| {
        let arg = |i: usize| match args.get(i) {
            Some(BytesFrame::BulkString(b)) => b.clone(),
            _ => Bytes::new(),
        };
        let mut out = Vec::new();
        match &arg(0).to_ascii_uppercase()[..] {
            b"SCRIPT" => out.extend(format!("$40\r\n{}\r\n", "0".repeat(40)).bytes()),
            b"GET" if !d.load(Ordering::SeqCst) => out.extend_from_slice(&reply),
            b"GET" => out.extend_from_slice(b"$-1\r\n"),
            b"SCAN" => {
                // Once the test says the lookup went: the URL's index set, under
                // the prefix asked for.
                g.wait(Duration::from_secs(10));
                let pattern = arg(3);
                let set = &pattern[..pattern.len() - 1];
                out.extend(format!("*2\r\n$1\r\n0\r\n*1\r\n${}\r\n", set.len()).bytes());
                out.extend_from_slice(set);
                out.extend_from_slice(b"\r\n");
            }
            // The purge log, which the gateway's listener reads on a connection
            // of its own: empty, and its wait for more never answered.
            b"EVAL" if arg(1).windows(9).any(|w| w == b"XREVRANGE") => {
                out.extend_from_slice(b"*3\r\n$-1\r\n*0\r\n$-1\r\n")
            }
            b"XREAD" => {}
            b"EVAL" | b"DEL" => {
                d.store(true, Ordering::SeqCst);
                out.extend_from_slice(b":1\r\n");
            }
            b"PUBLISH" | b"EVALSHA" => out.extend_from_slice(b":0\r\n"),
            _ => out.extend_from_slice(b"+OK\r\n"),
        }
        s.write_all(&out).is_ok()
    });
    let up = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 3\r\n\r\nnew"
                .to_vec(),
        )
    });
    let toml = format!(
        "[server]\nworkers = 1\n[admin]\naddress = \"127.0.0.1:0\"\n{}",
        redis_cache_config(up.addr, addr, "10s")
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let api = gw.gateway().admin_addr().expect("the admin API runs");
    let lookups = || {
        let m = request(api, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").text();
        m.lines()
            .find_map(|l| l.strip_prefix("ringway_cache_redis_lookups_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Redis holds the copy: it answers, and is kept here.
    let r = get(gw.addr, "/p/x");
    assert_eq!(&r.body[..], b"old", "{r:?}");
    assert_eq!(up.hits(), 0);
    let purge = request(
        api,
        b"POST /cache/purge?prefix=test.local/p/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(purge.status, 200, "{}", purge.text());
    // Looked up in Redis before the purge deleted the copy there: not taken.
    let before = lookups();
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /p/x HTTP/1.1\r\nHost: test.local\r\n\r\n");
    assert!(
        eventually(Duration::from_secs(5), || lookups() > before),
        "the lookup went to Redis"
    );
    go.set();
    let r = c.read_response().expect("an answer");
    assert_eq!(&r.body[..], b"new", "{r:?}");
    assert_eq!(up.hits(), 1);
    assert!(
        eventually(Duration::from_secs(5), || deleted.load(Ordering::SeqCst)),
        "the copy is deleted in Redis"
    );
    // Once deleted there, what was fetched is kept and served.
    let r = get(gw.addr, "/p/x");
    assert_eq!(&r.body[..], b"new", "{r:?}");
    assert_eq!(up.hits(), 1);
    drop(gw);
    fake.stop();
}
