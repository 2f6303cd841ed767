//! Global rate limits through a real `redis-server`: several gateway processes sharing one
//! limit, Redis killed and restarted under load, fail-open and fail-closed.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringway::config::DriverChoice;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_ringway");
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn redis_config(
    listen: &str,
    up: SocketAddr,
    redis: &RedisServer,
    extra: &str,
    limit: &str,
) -> String {
    format!(
        "[[listeners]]\naddress = \"{listen}\"\n\
         [upstreams.u]\nendpoints = [{{ address = \"{up}\" }}]\n\
         [rate_limiting]\nbackend = \"redis\"\n\
         [rate_limiting.redis]\naddress = \"127.0.0.1:{}\"\ntimeout = \"50ms\"\nretry_interval = \"200ms\"\n{extra}\n\
         [[routes]]\nname = \"api\"\nupstream = \"u\"\nrate_limits = [{limit}]\n",
        redis.port
    )
}

/// One in-process gateway on the Redis backend that fails open.
fn fail_open_gateway(up: SocketAddr, redis: &RedisServer, limit: &str) -> TestGateway {
    TestGateway::start(
        &redis_config("127.0.0.1:0", up, redis, "on_failure = \"local\"", limit),
        DriverChoice::Auto,
    )
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_gateway(config: &str, addr: SocketAddr) -> Proc {
    let dir = std::env::temp_dir().join(format!("ringway-redis-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("gw-{}.toml", addr.port()));
    std::fs::write(&file, config).unwrap();
    let child = Command::new(BIN)
        .args(["run", "--workers", "1", "-c"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ringway");
    let p = Proc(child);
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok()),
        "gateway did not listen on {addr}"
    );
    p
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Three gateway processes, one limit of 300/s in Redis, clients at twice the limit spread over
/// all three: the aggregate admitted stays within ±10% of what the limit allows, and Redis
/// sees a fraction of the request rate.
#[test]
fn three_gateway_processes_share_one_limit() {
    let redis = RedisServer::start();
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let limit = "{ key = \"route\", rate = 300, per = \"1s\", burst = 30 }";
    let _gws: Vec<Proc> = addrs
        .iter()
        .map(|a| {
            spawn_gateway(
                &redis_config(&a.to_string(), up.addr, &redis, "", limit),
                *a,
            )
        })
        .collect();
    let before = redis.calls("evalsha");
    let t0 = Instant::now();
    // 3 gateways × 4 connections × 50 requests/s = 600/s, twice the limit.
    let seen = paced_load(
        &addrs,
        4,
        Duration::from_millis(20),
        Duration::from_secs(3),
        GET,
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let ok = *seen.get(&200).unwrap_or(&0) as f64;
    let refused = *seen.get(&429).unwrap_or(&0);
    let commands = redis.calls("evalsha") - before;
    let expected = 30.0 + 300.0 * elapsed;
    let err = (ok - expected) / expected;
    println!(
        "3 processes: {ok} admitted, {refused} refused in {elapsed:.2} s; the limit allows \
         {expected:.0} ({:+.1}%); {commands} EVALSHA = {:.3} per admitted request, \
         {:.3} per request",
        err * 100.0,
        commands as f64 / ok,
        commands as f64 / (ok + refused as f64)
    );
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![200, 429],
        "only admitted and refused: {seen:?}"
    );
    assert!(err.abs() <= 0.10, "aggregate {ok} vs {expected:.0}");
    assert!(
        (commands as f64) < ok * 0.5,
        "tokens are leased in batches: {commands} commands for {ok} admitted"
    );
    assert_eq!(redis.keys("ringway:rl:api:route:*").len(), 1);
}

/// The first requests of a key wait for Redis's answer; every key gets its own Redis bucket.
#[test]
fn keys_live_in_redis_and_limits_hold_on_both_drivers() {
    for d in DRIVERS {
        let redis = RedisServer::start();
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
        let limit = "{ key = \"header:x-user\", rate = 3, per = \"1m\" }";
        let gw = TestGateway::start(&redis_config("127.0.0.1:0", up.addr, &redis, "", limit), d);
        let status = |user: &str| {
            request(
                gw.addr,
                format!("GET / HTTP/1.1\r\nHost: a\r\nX-User: {user}\r\n\r\n").as_bytes(),
            )
            .status
        };
        for user in ["ann", "bob"] {
            let s: Vec<u16> = (0..4).map(|_| status(user)).collect();
            assert_eq!(s, vec![200, 200, 200, 429], "{d:?} {user}");
        }
        assert_eq!(
            redis.keys("ringway:rl:api:x-user:*").len(),
            2,
            "{d:?}: one bucket per user"
        );
        // A second gateway on the same Redis sees the same, already spent, buckets.
        let gw2 = TestGateway::start(&redis_config("127.0.0.1:0", up.addr, &redis, "", limit), d);
        let r = request(
            gw2.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nX-User: ann\r\n\r\n",
        );
        assert_eq!(r.status, 429, "{d:?}: spent on the other gateway");
        assert_eq!(r.json()["error"], "rate_limited");
    }
}

/// Redis killed mid-run: requests keep being answered, on local buckets (fail open), nothing
/// hangs and nothing fails; restarted, the gateway goes back to Redis by itself.
#[test]
fn redis_killed_and_restarted_under_load_fails_open_and_recovers() {
    let mut redis = RedisServer::start();
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let limit = "{ key = \"route\", rate = 100, per = \"1s\", burst = 20 }";
    let gw = fail_open_gateway(up.addr, &redis, limit);
    let addrs = [gw.addr];
    let seen = paced_load(
        &addrs,
        2,
        Duration::from_millis(10),
        Duration::from_millis(500),
        GET,
    );
    assert!(seen.contains_key(&200), "{seen:?}");
    assert!(redis.calls("evalsha") > 0);

    redis.kill();
    // 2 × 100/s for 1.5 s against a 100/s limit kept locally now.
    let t0 = Instant::now();
    let seen = paced_load(
        &addrs,
        2,
        Duration::from_millis(10),
        Duration::from_millis(1500),
        GET,
    );
    let elapsed = t0.elapsed().as_secs_f64();
    println!("redis down: {seen:?} in {elapsed:.2} s");
    assert_eq!(
        seen.keys()
            .copied()
            .filter(|s| *s != 200 && *s != 429)
            .count(),
        0,
        "only 200 and 429 while Redis is down: {seen:?}"
    );
    let ok = *seen.get(&200).unwrap_or(&0) as f64;
    assert!(
        ok <= 20.0 + 100.0 * elapsed + 40.0,
        "local buckets still limit: {ok} admitted in {elapsed:.2} s"
    );
    assert!(ok >= 50.0, "fail open admits traffic: {ok}");

    redis.restart();
    assert!(
        eventually(Duration::from_secs(5), || {
            let _ = request(gw.addr, GET);
            redis.calls("evalsha") > 0
        }),
        "the gateway uses the restarted Redis"
    );
    assert_eq!(redis.keys("ringway:rl:api:route:*").len(), 1);
}

/// Fail closed: without Redis, limited routes answer 503 at once (no hang); once Redis runs,
/// they are served again.
#[test]
fn fail_closed_answers_503_until_redis_is_back() {
    let mut redis = RedisServer::start();
    redis.kill();
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let limit = "{ key = \"client_ip\", rate = 100, per = \"1s\" }";
    let gw = TestGateway::start(
        &redis_config(
            "127.0.0.1:0",
            up.addr,
            &redis,
            "on_failure = \"deny\"",
            limit,
        ),
        DriverChoice::Auto,
    );
    for _ in 0..3 {
        let r = get(gw.addr, "/");
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"], "rate_limit_unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(up.hits(), 0);
    redis.restart();
    assert!(
        eventually(Duration::from_secs(5), || get(gw.addr, "/").status == 200),
        "served again once Redis answers"
    );
}

#[test]
fn redis_backend_needs_an_address() {
    let e = ringway::config::Config::parse(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[rate_limiting]\nbackend = \"redis\"\n",
        "gw.toml",
    )
    .unwrap_err();
    assert_eq!(e.key, "rate_limiting.redis");
    assert!(e.to_string().contains("gw.toml"), "{e}");
}

/// A daily quota per client lives in Redis: spent on one gateway, it is spent on all; the
/// refusal says when the next UTC day starts.
#[test]
fn daily_quotas_are_kept_in_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let cfg = redis_config(
        "127.0.0.1:0",
        up.addr,
        &redis,
        "",
        "{ key = \"route\", rate = 1000, per = \"1s\" }]\nquotas = [{ key = \"client_ip\", limit = 4, period = \"day\" }",
    );
    // A slow answer from Redis would fail open to each host's own quota (4 more each): the
    // timeout here is for a loaded machine, not the 50 ms of the other tests.
    let cfg = cfg.replace("timeout = \"50ms\"", "timeout = \"5s\"");
    let a = TestGateway::start(&cfg, DriverChoice::Auto);
    let b = TestGateway::start(&cfg, DriverChoice::Auto);
    let mut seen = Vec::new();
    for gw in [&a, &b, &a, &b, &a, &b] {
        seen.push(get(gw.addr, "/"));
    }
    let statuses: Vec<u16> = seen.iter().map(|r| r.status).collect();
    // Four in all across both hosts (either alone would admit four). Which of the last three
    // gets the fourth depends on where the last unit is: a host takes one at a time from Redis
    // and may hold it in stock while the other is refused (README: a quota is short by at
    // most those stocks), as a loaded machine showed (200, 200, 200, 429, 200, 429).
    assert_eq!(statuses[..3], [200, 200, 200], "{statuses:?}");
    let mut rest = statuses[3..].to_vec();
    rest.sort_unstable();
    assert_eq!(rest, [200, 429, 429], "{statuses:?}");
    let refused = seen.iter().find(|r| r.status == 429).expect("a refusal");
    assert_eq!(refused.json()["error"], "rate_limited");
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"day\";q=4;w=86400")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry.abs_diff(to_midnight) <= 5,
        "retry-after {retry}, midnight in {to_midnight}"
    );
    // One counter for today, with an expiry after the day ends.
    let keys = redis.keys(&format!("ringway:q:api:day:{}:*", now / 86_400));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl = redis.command(&["TTL", &keys[0]]).unwrap();
    let ttl: u64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(ttl > to_midnight && ttl <= to_midnight + 3_700, "ttl {ttl}");
}

/// A slow Redis (every client paused): requests that need an answer from it wait at most the
/// configured timeout, then take the local buckets; once Redis answers again, it is used again.
#[test]
fn a_slow_redis_never_holds_requests_past_its_timeout() {
    let redis = RedisServer::start();
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let limit = "{ key = \"header:x-user\", rate = 100, per = \"1s\" }";
    let gw = fail_open_gateway(up.addr, &redis, limit);
    let user = |u: &str| {
        request(
            gw.addr,
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-User: {u}\r\n\r\n").as_bytes(),
        )
    };
    assert_eq!(user("warm").status, 200);
    let before = redis.calls("evalsha");
    assert!(before > 0);
    assert!(redis
        .command(&["CLIENT", "PAUSE", "1500", "ALL"])
        .is_some_and(|r| r.starts_with("+OK")));
    // New keys need Redis, which does not answer: each is served from a local bucket.
    for i in 0..5 {
        let r = user(&format!("new-{i}"));
        assert_eq!(r.status, 200, "request {i} while Redis is paused");
    }
    assert!(
        eventually(Duration::from_secs(6), || {
            let _ = user("after");
            redis.calls("evalsha") > before
        }),
        "Redis is used again after the pause"
    );
}

/// The rewrite a 304 makes of a variant only Redis holds (RFC 9111 §4.3.4) is a
/// compare-and-set: it writes only over the bytes it read, so that an entry another host wrote
/// in between (possibly another representation) stays; what it writes is listed in the index
/// sets and they, and the variant list, last as long as it. Run by a real redis-server.
#[test]
fn a_cache_entry_is_rewritten_only_over_what_was_read() {
    use ringway::cache::redis::REWRITE_IF_UNCHANGED_LUA as LUA;
    let redis = RedisServer::start();
    let cmd = |args: &[&str]| redis.command(args).unwrap_or_default();
    cmd(&["SET", "w:k", "old", "EX", "50"]);
    cmd(&["RPUSH", "v:k", "w:k"]);
    cmd(&["EXPIRE", "v:k", "50"]);
    let rewrite = |read: &str, new: &str| {
        cmd(&[
            "EVAL", LUA, "4", "w:k", "v:k", "u:url", "t:tag", read, new, "900",
        ])
    };
    // Another host wrote "other" since "stale" was read: nothing is written.
    assert_eq!(rewrite("stale", "x"), ":0\r\n");
    assert_eq!(cmd(&["GET", "w:k"]), "$3\r\nold\r\n");
    assert_eq!(cmd(&["EXISTS", "u:url"]), ":0\r\n");
    // Over what was read: written, with its expiry, listed, and the list kept as long.
    assert_eq!(rewrite("old", "new"), ":1\r\n");
    assert_eq!(cmd(&["GET", "w:k"]), "$3\r\nnew\r\n");
    for key in ["w:k", "v:k", "u:url", "t:tag"] {
        let ttl: i64 = cmd(&["TTL", key])
            .trim()
            .trim_start_matches(':')
            .parse()
            .unwrap_or(-3);
        assert!((890..=900).contains(&ttl), "{key}: {ttl}");
    }
    for set in ["u:url", "t:tag"] {
        assert_eq!(cmd(&["SISMEMBER", set, "w:k"]), ":1\r\n", "{set}");
    }
    // An entry gone since it was read (evicted, purged) is not written back.
    cmd(&["DEL", "w:k"]);
    assert_eq!(rewrite("new", "again"), ":0\r\n");
    assert_eq!(cmd(&["EXISTS", "w:k"]), ":0\r\n");
}

/// A connection Redis closed while it was idle (its `timeout` setting; a NAT or a proxy that
/// drops idle flows does the same) is replaced before the next round, not failed with it:
/// before, the first demand after the idle period met the closed socket, the link was marked
/// down for `retry_interval`, and with `on_failure = "deny"` new keys were answered 503 (a
/// probe: `timeout 1`, 2.5 s idle, then 503 503 503 and "unreachable (unexpected end of
/// file)" logged).
#[test]
fn a_connection_redis_closed_while_idle_is_replaced_not_failed() {
    let redis = RedisServer::start();
    assert!(redis
        .command(&["CONFIG", "SET", "timeout", "1"])
        .is_some_and(|r| r.starts_with("+OK")));
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let limit = "{ key = \"header:x-k\", rate = 1000, per = \"1s\" }";
    let gw = TestGateway::start(
        &redis_config(
            "127.0.0.1:0",
            up.addr,
            &redis,
            "on_failure = \"deny\"",
            limit,
        ),
        DriverChoice::Auto,
    );
    let with_key = |k: &str| {
        request(
            gw.addr,
            format!("GET / HTTP/1.1\r\nHost: a\r\nx-k: {k}\r\n\r\n").as_bytes(),
        )
    };
    assert_eq!(with_key("first").status, 200);
    // The link's connection is the one whose last command was EVALSHA; Redis closes it once
    // it has been idle past a second.
    let link_open = || {
        redis
            .command(&["CLIENT", "LIST"])
            .is_some_and(|l| l.contains("cmd=evalsha"))
    };
    assert!(link_open());
    assert!(
        eventually(Duration::from_secs(10), || !link_open()),
        "Redis closed the idle link"
    );
    for k in ["a", "b", "c"] {
        assert_eq!(with_key(k).status, 200, "a new key after the idle period");
    }
}

/// A lookup of an entry too large to read within `timeout` shares its round with a write, a
/// lookup and an `INCR`, all run by a real Redis. Between the link and Redis a relay passes
/// the round on whole, and of Redis's answers only the first 64 KiB (`a`'s 8 MiB entry's
/// length and the start of its bytes), until the link gives up on the round and closes the
/// connection (an event, not a clock: the link's `timeout` may be anything); later
/// connections go through untouched. The large lookup fails alone (a miss, counted), the link
/// stays up, and of the commands behind it, which Redis ran, the repeatable ones (the write,
/// the lookup) are sent again on a fresh connection and answered, while the `INCR`, which
/// counts, is not: it gets `None` and Redis counted it once. Before, every command behind the
/// large reply got `None` (the lookup a miss, the write's answer lost).
#[test]
fn commands_behind_a_reply_too_large_for_the_timeout_are_sent_again_when_repeatable() {
    use bytes::Bytes;
    use ringway::redis::{spawn, Command, RedisLink, SMALL_REPLY_BYTES};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};

    let redis = RedisServer::start();
    let ok = |r: Option<String>| r.is_some_and(|r| !r.starts_with('-'));
    assert!(ok(redis.command(&["SETRANGE", "big", "8388607", "x"])));
    assert!(ok(redis.command(&["SET", "small", "v"])));
    let relay = TcpListener::bind("127.0.0.1:0").expect("bind");
    let relay_addr = relay.local_addr().expect("addr");
    let redis_addr = redis.addr();
    let relayed = std::thread::spawn(move || {
        let (mut link, _) = relay.accept().expect("the link connects");
        let mut up = TcpStream::connect(redis_addr).expect("redis");
        let (mut round, mut chunk) = (Vec::new(), [0u8; 64 * 1024]);
        while !round.windows(9).any(|w| w == b"counted\r\n") {
            match link.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => round.extend_from_slice(&chunk[..n]),
            }
        }
        up.write_all(&round).expect("to redis");
        up.read_exact(&mut chunk).expect("from redis");
        let _ = link.write_all(&chunk);
        // Held until the link closes the connection (what it sends meanwhile is nothing).
        while matches!(link.read(&mut chunk), Ok(n) if n > 0) {}
        drop(up);
        // The next connection, passed on both ways until the link closes it.
        let (link, _) = relay.accept().expect("the link connects again");
        let up = TcpStream::connect(redis_addr).expect("redis");
        let (mut l2, mut u2) = (
            link.try_clone().expect("clone"),
            up.try_clone().expect("clone"),
        );
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut l2);
        });
        let (mut link, mut up) = (link, up);
        let _ = std::io::copy(&mut link, &mut up);
        let _ = up.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    let cfg: ringway::config::RedisConfig = toml::from_str(&format!(
        "address = \"{relay_addr}\"\ntimeout = \"500ms\"\n"
    ))
    .expect("config");
    let link = RedisLink::with_role(cfg, "cache");
    let mut rxs = Vec::new();
    let cmds: [(&[&'static [u8]], bool); 4] = [
        (&[b"GET", b"big"], true),
        (&[b"SET", b"written", b"w"], true),
        (&[b"GET", b"small"], true),
        (&[b"INCR", b"counted"], false),
    ];
    // Queued before the link's thread starts: they go as one round.
    for (args, repeatable) in cmds {
        let (tx, rx) = mpsc::channel::<Option<String>>();
        link.command(Command {
            args: args.iter().map(|a| Bytes::from_static(a)).collect(),
            max_reply: SMALL_REPLY_BYTES,
            repeatable,
            done: Some(Box::new(move |f| {
                let _ = tx.send(f.map(|f| format!("{f:?}")));
            })),
        });
        rxs.push(rx);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let thread = spawn(link.clone(), stop.clone()).expect("thread");
    let got: Vec<Option<String>> = rxs
        .iter()
        .map(|rx| rx.recv_timeout(Duration::from_secs(30)).expect("an answer"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    let _ = thread.join();
    // A link that never connected again leaves the relay waiting for a connection.
    drop(TcpStream::connect(relay_addr));
    let _ = relayed.join();
    assert_eq!(got[0], None, "the large lookup fails alone");
    assert!(
        got[1].as_deref().is_some_and(|f| f.contains("OK")),
        "{got:?}"
    );
    assert!(
        got[2].as_deref().is_some_and(|f| f.contains('v')),
        "{got:?}"
    );
    assert_eq!(got[3], None, "the INCR is not sent again");
    let counted = redis.command(&["GET", "counted"]).unwrap_or_default();
    assert_eq!(counted, "$1\r\n1\r\n", "counted once");
    assert!(!link.is_down());
    assert_eq!(link.failures.load(Ordering::Relaxed), 0);
    assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 1);
}
