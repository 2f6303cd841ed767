//! Whole-connection property test of the response cache's shared layer (`[cache.redis]`,
//! RFC 9111) on stable Rust with proptest: `tests/fuzz_cache_conn.rs` across two hosts.
//!
//! A real `redis-server` is the shared layer of two gateways in this process: host A on
//! io_uring with 2 workers, host B on epoll with 1, both with the admin API, in front of one
//! origin test server. Each case has the origin script of `tests/fuzz_cache_conn.rs` (its
//! statuses, `Cache-Control` mixes, validators, `Vary`, `Set-Cookie`, `Age`, framings; every
//! response also tagged with `Surrogate-Key`s: one of its URL, one shared by the case's first
//! two URLs; half of the responses made a plain fresh 200) and a script of steps: a request
//! of that file's grammar (two in five made a plain GET) to host A or B (on one
//! keep-alive connection per host, reopened after an answer that closes it; pipelined with
//! the requests to the same host right before it), a purge through a host's admin API
//! (`POST /cache/purge` with `url=`, `prefix=`, `tag=` or `all=1`, hard or `soft=1`), or a
//! pause of 1.1 s (time spent in the stores and in Redis).
//!
//! A purge, and a write (an unsafe method), reaches the other host through the purge log in
//! Redis, not at once: after each, the step waits until both hosts have read the log past
//! it (a purge of an unused URL made after it through the same host, found in the log, then
//! each host's count of purges heard at least the log's length, then a control round trip
//! to every worker, which runs after the purge jobs the listener posted).
//!
//! Asserted, besides every check of `tests/fuzz_cache_conn.rs` (framing, one answer per
//! request in order, no body crossing URLs, no variant to a request it does not match, nothing
//! stored that RFC 9111 forbids to store, `Age` at least what the origin's fields give,
//! invalidation by unsafe methods, §4.4, now on both hosts), for every answer from a store
//! (this host's, or one it took from Redis):
//! - once a hard purge that covers its URL (or a tag it carries, or everything) is done, no
//!   response the origin sent before the purge is answered from either host (RFC 9111 §4.4;
//!   the README's purge guarantees): a store answers it only when fetched after;
//! - a response a soft purge covered is not answered as fresh without validation: only to a
//!   request with `max-stale`, within a `stale-while-revalidate` window (its own, or the
//!   route's) or after an origin error (`stale-if-error`), never with `must-revalidate`,
//!   `proxy-revalidate` or `s-maxage` (RFC 9111 §4.2.4);
//! - its `Age` is at least the origin's `Age` plus the whole seconds since the origin sent it
//!   (RFC 9111 §4.2.3: the time in the store and in Redis counts, on the host that took it
//!   from there too).
//!
//! After each case both hosts answer a GET on a fresh connection.
//!
//! No purge is excused: a copy the other host fetched before a purge, whose write to Redis
//! ran after the purge's deletion, once came back from Redis (found here; by URL and tag
//! each host that hears the purge deletes the copies again, by prefix and of everything an
//! entry written before the writer applied the purge is refused; see the README's purge
//! item). `RINGWAY_FUZZ_STRICT_PURGE`, which stopped excusing the latter, is no longer read.
//!
//! Case count: `RINGWAY_FUZZ_CASES` (default 12 per route setting, two settings: some 15 s in
//! a debug build). A longer run:
//! `RINGWAY_FUZZ_CASES=300 cargo test --test fuzz_cache_redis -- --nocapture`.

#[path = "prop_support/cache_fuzz.rs"]
mod cache_fuzz;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_fuzz::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use ringway::config::DriverChoice;
use support::*;

const DEFAULT_CASES: u32 = 12;
/// The pause step.
const PAUSE: Duration = Duration::from_millis(1100);
/// How long a purge may take to reach both hosts.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// What a purge names.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// One of the case's URLs.
    Url(usize),
    /// `fuzz.test/c/<case>/` followed by this.
    Prefix(&'static str),
    /// A URL's own surrogate key, or (`URLS`) the one the first two URLs share.
    Tag(usize),
    All,
}

#[derive(Debug, Clone)]
enum Step {
    Req {
        host: usize,
        r: ClientReq,
    },
    Purge {
        via: usize,
        target: Target,
        soft: bool,
    },
    Pause,
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => (0..URLS).prop_map(Target::Url),
        2 => prop::sample::select(vec!["", "u", "u1"]).prop_map(Target::Prefix),
        3 => (0..=URLS).prop_map(Target::Tag),
        1 => Just(Target::All),
    ]
}

/// `tests/fuzz_cache_conn.rs`'s client grammar, two requests in five made a plain GET (their
/// `Accept-Encoding` / `Accept-Language` and pipelining kept), so that the stores and Redis
/// are asked often.
fn fleet_client_req() -> impl Strategy<Value = ClientReq> {
    (client_req(), prop::bool::weighted(0.4)).prop_map(|(r, plain)| {
        if !plain {
            return r;
        }
        ClientReq {
            method: "GET",
            auth: false,
            if_none_match: None,
            if_modified_since: None,
            if_match: None,
            if_range: None,
            range: None,
            cache_control: None,
            pragma: false,
            close: false,
            http10: false,
            body: 0,
            ..r
        }
    })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        14 => (0..2usize, fleet_client_req()).prop_map(|(host, r)| Step::Req { host, r }),
        3 => (0..2usize, target(), any::<bool>())
            .prop_map(|(via, target, soft)| Step::Purge { via, target, soft }),
        1 => Just(Step::Pause),
    ]
}

#[derive(Debug, Clone)]
struct FleetCase {
    origin: Vec<OriginSpec>,
    steps: Vec<Step>,
}

/// `tests/fuzz_cache_conn.rs`'s origin grammar, half of it made a plain fresh 200 (its
/// validators, `Vary`, `Age` and framing kept), so that the hosts share something to serve.
fn fleet_origin_spec() -> impl Strategy<Value = OriginSpec> {
    (origin_spec(), any::<bool>()).prop_map(|(mut s, plain)| {
        if plain {
            s.status = 200;
            s.cache_control = vec![vec!["max-age=3600"]];
            s.set_cookie = false;
        }
        s
    })
}

fn fleet_case() -> impl Strategy<Value = FleetCase> {
    (
        prop::collection::vec(fleet_origin_spec(), 1..6),
        prop::collection::vec(step(), 1..24),
    )
        .prop_map(|(origin, steps)| FleetCase { origin, steps })
}

/// A purge made in the case, and done on both hosts.
struct Done {
    target: Target,
    soft: bool,
    /// The origin's responses sent before it began.
    before: usize,
}

impl Done {
    fn covers(&self, s: &Sent, case_no: usize) -> bool {
        match self.target {
            Target::Url(u) => s.path == format!("/c/{case_no}/u{u}"),
            Target::Prefix(p) => s.path.starts_with(&format!("/c/{case_no}/{p}")),
            Target::Tag(t) => surrogate_keys(&s.path).contains(&tag(case_no, t)),
            Target::All => true,
        }
    }
}

fn tag(case_no: usize, t: usize) -> String {
    if t < URLS {
        format!("k{case_no}-u{t}")
    } else {
        format!("k{case_no}-g")
    }
}

/// Two gateways sharing one Redis.
struct Fleet {
    redis: RedisServer,
    hosts: [TestGateway; 2],
    admin: [SocketAddr; 2],
}

impl Fleet {
    fn start(up: SocketAddr, cache: &str) -> Fleet {
        let redis = RedisServer::start();
        let host = |workers: usize, d: DriverChoice| {
            let toml = config(
                &[up],
                &format!(
                    "[server]\nworkers = {workers}\n\
                     [admin]\naddress = \"127.0.0.1:0\"\n\
                     [cache.redis]\naddress = \"127.0.0.1:{}\"\ntimeout = \"200ms\"\n\
                     retry_interval = \"100ms\"\npurge_log_length = 100000\n\
                     [[routes]]\npath_prefix = \"/c\"\nupstream = \"up\"\ncache = {{ {cache} }}\n",
                    redis.port
                ),
            );
            TestGateway::start(&toml, d)
        };
        let hosts = [host(2, DriverChoice::IoUring), host(1, DriverChoice::Epoll)];
        let admin = [0, 1].map(|h| hosts[h].gateway().admin_addr().expect("the admin API"));
        let f = Fleet {
            redis,
            hosts,
            admin,
        };
        // Both hosts follow the purge log before the first case.
        assert!(
            eventually(Duration::from_secs(10), || f
                .redis
                .command(&["CLIENT", "LIST"])
                .unwrap_or_default()
                .matches("cmd=xread")
                .count()
                == 2),
            "the hosts do not follow the purge log"
        );
        f
    }

    /// Purges through host `via`'s admin API.
    fn purge(&self, via: usize, query: &str) -> Result<(), String> {
        let raw = format!(
            "POST /cache/purge?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        );
        let r = request(self.admin[via], raw.as_bytes());
        if r.status != 200 {
            return Err(format!("the admin purge {query} through host {via}: {r:?}"));
        }
        Ok(())
    }

    /// The purges each host has read from the log.
    fn heard(&self, h: usize) -> u64 {
        self.hosts[h]
            .gateway()
            .control()
            .ask(Duration::from_secs(2), |w| {
                w.cache
                    .shared()
                    .map_or(0, |l| l.purges_heard.load(Ordering::Relaxed))
            })
            .map_or(0, |v| v[0])
    }

    /// Waits until both hosts applied every purge logged so far through host `via` (see
    /// the file's comment).
    fn settle(&self, via: usize) -> Result<(), String> {
        static MARK: AtomicUsize = AtomicUsize::new(0);
        let m = MARK.fetch_add(1, Ordering::Relaxed);
        let url = format!("fuzz.test/m/{m}");
        self.purge(via, &format!("url={url}"))?;
        let logged = format!("{url}\r\n");
        let log = "ringway:cache:purge-log";
        if !eventually(SETTLE_LIMIT, || {
            self.redis
                .command(&["XREVRANGE", log, "+", "-", "COUNT", "64"])
                .is_some_and(|v| v.contains(&logged))
        }) {
            return Err(format!("the purge of {url} never reached the log"));
        }
        let len: u64 = self
            .redis
            .command(&["XLEN", log])
            .and_then(|v| v.trim().trim_start_matches(':').parse().ok())
            .ok_or("XLEN")?;
        for h in 0..2 {
            if !eventually(SETTLE_LIMIT, || self.heard(h) >= len) {
                return Err(format!(
                    "host {h} read {} purges of the log's {len}",
                    self.heard(h)
                ));
            }
            // Runs after the purge jobs the log's listener posted before it counted the
            // marker.
            self.hosts[h]
                .gateway()
                .control()
                .ask(Duration::from_secs(2), |_| ())
                .map_err(|e| format!("host {h}: {e}"))?;
        }
        Ok(())
    }
}

fn purge_query(case_no: usize, t: Target, soft: bool) -> String {
    let q = match t {
        Target::Url(u) => format!("url=fuzz.test/c/{case_no}/u{u}"),
        Target::Prefix(p) => format!("prefix=fuzz.test/c/{case_no}/{p}"),
        Target::Tag(i) => format!("tag={}", tag(case_no, i)),
        Target::All => "all=1".to_string(),
    };
    if soft {
        q + "&soft=1"
    } else {
        q
    }
}

/// The checks across hosts of an answer `a` to request `id` sent at `t_ms`, after the purges
/// `done` (see the file's comment).
#[allow(clippy::too_many_arguments)]
fn check_fleet(
    r: &ClientReq,
    id: &str,
    a: &Answer,
    sent: &[Sent],
    done: &[Done],
    t_ms: u64,
    case_no: usize,
    strip: bool,
) -> Result<(), String> {
    let Some((serial, src)) = source_of(a, sent) else {
        return Ok(());
    };
    if src.req_id.as_deref() == Some(id) {
        return Ok(());
    }
    if done.iter().any(|d| d.covers(src, case_no)) {
        AFTER_PURGE.fetch_add(1, Ordering::Relaxed);
    }
    for d in done
        .iter()
        .filter(|d| serial < d.before && d.covers(src, case_no))
    {
        if !d.soft {
            return Err(format!(
                "a response sent before a hard purge of {:?} answered from a store after it \
                 (RFC 9111 §4.4)",
                d.target
            ));
        }
        let errored = sent
            .iter()
            .any(|s| s.req_id.as_deref() == Some(id) && matches!(s.status, 500 | 502 | 503 | 504));
        let swr = directives(&src.spec)
            .iter()
            .any(|(n, _)| n == "stale-while-revalidate");
        let max_stale = r.cache_control.is_some_and(|v| v.starts_with("max-stale"));
        SOFT_STALE.fetch_add(1, Ordering::Relaxed);
        if forbids_stale(&src.spec) || !(errored || swr || strip || max_stale) {
            return Err(format!(
                "a response a soft purge of {:?} marked stale answered as fresh, without \
                 validation (RFC 9111 §4.2.4)",
                d.target
            ));
        }
    }
    if src.status != 304 {
        let age: u64 = a
            .header("age")
            .and_then(|v| v.parse().ok())
            .ok_or("no Age from the store")?;
        let origin_age: u64 = match src.spec.age {
            Some("10") => 10,
            Some("99999") => 99_999,
            _ => 0,
        };
        let elapsed = t_ms.saturating_sub(src.at_ms) / 1000;
        if age < origin_age + elapsed {
            return Err(format!(
                "Age {age}, below the origin's Age ({origin_age}) plus the {elapsed} s since \
                 the origin sent it (RFC 9111 §4.2.3)"
            ));
        }
    }
    Ok(())
}

static CASE_NO: AtomicUsize = AtomicUsize::new(0);
/// Answers whose `Cache-Status` says they came from Redis.
static FROM_REDIS: AtomicUsize = AtomicUsize::new(0);
/// Answers from a store of a URL a purge of the case covered, and among them those of a
/// response sent before a soft purge (answered stale).
static AFTER_PURGE: AtomicUsize = AtomicUsize::new(0);
static SOFT_STALE: AtomicUsize = AtomicUsize::new(0);

fn run_case(
    stats: &Stats,
    f: &Fleet,
    origin: &Mutex<OriginState>,
    up: &Upstream,
    c: &FleetCase,
    strip: bool,
) -> Result<(), TestCaseError> {
    let fail = TestCaseError::fail;
    let case_no = CASE_NO.fetch_add(1, Ordering::Relaxed);
    let start = begin_case(origin, case_no, &c.origin);
    let paths: Vec<String> = (0..URLS).map(|u| format!("/c/{case_no}/u{u}")).collect();
    let mut conns: [Option<Reader>; 2] = [None, None];
    let seen_from = up.seen.lock().unwrap().len();
    let mut from_store = vec![false; c.steps.len()];
    let mut done: Vec<Done> = Vec::new();
    let mut k = 0;
    while k < c.steps.len() {
        let host = match &c.steps[k] {
            Step::Pause => {
                std::thread::sleep(PAUSE);
                k += 1;
                continue;
            }
            Step::Purge { via, target, soft } => {
                let before = origin.lock().unwrap().sent.len();
                f.purge(*via, &purge_query(case_no, *target, *soft))
                    .map_err(fail)?;
                f.settle(*via).map_err(fail)?;
                done.push(Done {
                    target: *target,
                    soft: *soft,
                    before,
                });
                k += 1;
                continue;
            }
            Step::Req { host, .. } => *host,
        };
        // This request and those pipelined right after it to the same host.
        let mut batch = vec![k];
        k += 1;
        while let Some(Step::Req { host: h, r }) = c.steps.get(k) {
            if *h != host || !r.pipelined {
                break;
            }
            batch.push(k);
            k += 1;
        }
        let req = |i: usize| match &c.steps[i] {
            Step::Req { r, .. } => r,
            _ => unreachable!("a batch holds requests"),
        };
        let rd = conns[host].get_or_insert_with(|| Reader::connect(f.hosts[host].addr));
        let mut bytes = Vec::new();
        for &i in &batch {
            let r = req(i);
            bytes.extend(request_bytes(
                r,
                &paths[r.url],
                &format!("q{case_no}-{i}"),
                start,
            ));
        }
        let t_ms = ringway::date::unix_millis();
        if rd.s.write_all(&bytes).is_err() {
            return Err(fail("the gateway closed the connection early".into()));
        }
        let mut closed = false;
        for &i in &batch {
            let r = req(i);
            let id = format!("q{case_no}-{i}");
            let (a, sent) = next_answer(stats, rd, origin, r, i)?;
            if a.header("cache-status")
                .is_some_and(|v| v.contains("detail=redis"))
            {
                FROM_REDIS.fetch_add(1, Ordering::Relaxed);
            }
            check_answer(r, &paths[r.url], &id, &a, &sent, strip, start)
                .map_err(|e| fail(format!("host {host}: {e}")))?;
            check_fleet(r, &id, &a, &sent, &done, t_ms, case_no, strip).map_err(|e| {
                fail(format!(
                    "host {host}: {e}: request {r:?} to {} ({id}) got {a:?}",
                    paths[r.url]
                ))
            })?;
            from_store[i] = answered_from_store(&a, &sent, &id);
            if after_answer(r, i, &a)? {
                closed = true;
                break;
            }
        }
        if closed {
            end_connection(rd, true)?;
            conns[host] = None;
        }
        // A write's invalidation (RFC 9111 §4.4) reaches the other host through the log.
        if batch
            .iter()
            .any(|&i| !matches!(req(i).method, "GET" | "HEAD"))
        {
            f.settle(host).map_err(fail)?;
        }
    }
    for rd in conns.iter_mut().flatten() {
        end_connection(rd, false)?;
    }
    check_origin_saw(
        up,
        seen_from,
        case_no,
        &smuggled_path(&paths[0]),
        |i| match c.steps.get(i) {
            Some(Step::Req { r, .. }) => Some((r, from_store[i])),
            _ => None,
        },
    )?;
    stats
        .upstream
        .fetch_add(origin.lock().unwrap().sent.len(), Ordering::Relaxed);
    Ok(())
}

/// One run: a fleet with the route settings `tests/fuzz_cache_conn.rs` uses on driver `d`
/// (the defaults; or `Set-Cookie` stripped, a 64 KiB object bound and route stale windows).
fn fuzz(d: DriverChoice) {
    let (cache, strip) = cache_settings(d);
    let cases = std::env::var("RINGWAY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let state = Arc::new(Mutex::new(OriginState::default()));
    let st = state.clone();
    let mut up = Upstream::start(move |req| origin_answer(&st, req));
    let fleet = Fleet::start(up.addr, cache);
    let stats = Stats::default();
    let ran = AtomicUsize::new(0);
    let mut runner = TestRunner::new(PtConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..PtConfig::default()
    });
    let t0 = Instant::now();
    let result = runner.run(&fleet_case(), |c| {
        ran.fetch_add(1, Ordering::Relaxed);
        run_case(&stats, &fleet, &state, &up, &c, strip)?;
        for (h, gw) in fleet.hosts.iter().enumerate() {
            let r = get(gw.addr, "/c/alive");
            prop_assert_eq!(
                r.status,
                200,
                "host {} on a fresh connection after the case",
                h
            );
        }
        Ok(())
    });
    eprintln!(
        "strip={strip}: {} runs (shrinking included) in {:?}: {} answers, {} cache hits, {} \
         upstream (both runs so far: {} from a store unasked, {} from Redis, {} 206, {} 304, \
         {} from a store after a purge of the URL, {} of them soft-purged and stale)",
        ran.load(Ordering::Relaxed),
        t0.elapsed(),
        stats.answers.load(Ordering::Relaxed),
        stats.hits.load(Ordering::Relaxed),
        stats.upstream.load(Ordering::Relaxed),
        REUSED.load(Ordering::Relaxed),
        FROM_REDIS.load(Ordering::Relaxed),
        PARTIAL.load(Ordering::Relaxed),
        NOT_MODIFIED.load(Ordering::Relaxed),
        AFTER_PURGE.load(Ordering::Relaxed),
        SOFT_STALE.load(Ordering::Relaxed),
    );
    drop(fleet);
    // Re-raises a panic of an origin thread.
    up.stop();
    if let Err(e) = result {
        panic!("strip={strip}: {e}");
    }
}

#[test]
fn cached_fleet_fuzz_route_defaults() {
    fuzz(DriverChoice::IoUring);
}

#[test]
fn cached_fleet_fuzz_cookies_stripped_and_route_stale_windows() {
    fuzz(DriverChoice::Epoll);
}
