//! `[cache.redis]`: Redis as a layer shared by every worker and every host, behind the
//! per-worker stores.
//!
//! It goes through the same link as the rate limiter (`crate::redis`: one blocking connection
//! on its own thread, commands queued by the workers and sent as pipelines), with a link of
//! its own when both are configured.
//!
//! - A local miss asks Redis for the request's keys and waits at most `timeout`, asleep on
//!   the worker's doorbell (`crate::doorbell`) until the link's thread has the answers; no
//!   answer in time, an unreachable Redis or a bad entry is a miss (fail open).
//! - What a worker stores, it also writes to Redis (queued; the client never waits for it),
//!   when it is at most `max_entry_bytes`, with an expiry at the end of its usefulness
//!   (freshness left plus its stale windows, plus a minute for validation).
//! - Variants (RFC 9111 §4.1): `o:<key>` holds the entry written last for the key, whatever
//!   its Vary values; an entry that varies is also written under a key of its own, `w:<key>
//!   and its Vary values>`, listed in `v:<key>`, newest first and at most the variant cap long
//!   (a script deletes the variants past it). A lookup asks for `o:<key>`, and in the same
//!   round trip for the request's variant when the worker knows the Vary field names (it holds
//!   a variant of the key); when `o:<key>` is another variant, a second round trip asks for the
//!   request's variant, named after the field names that entry carries.
//! - Entries carry their timing (the Unix second they were received, their corrected initial
//!   age, lifetime and stale windows), so that freshness and `Age` are computed on every host
//!   as on the host that fetched them (clocks kept by NTP).
//! - Purges by URL and by surrogate key delete the Redis copies too (through index sets kept
//!   per URL and per tag), and every purge is appended to the purge log `<prefix>purge-log`
//!   (a stream, also published on `<prefix>purge` for earlier versions): each host runs a
//!   thread that follows the log and applies each purge to its workers' stores (through
//!   `crate::control`), so a purge reaches every host's local stores, also one whose
//!   connection to Redis was down when it was made (see `LogCursor`). A purge whose Redis
//!   side fails is kept and sent again: once the link is up when it was down, and on a
//!   timer with backoff when the link stayed up (an error answered, the queue full; see
//!   `SharedLayer::retry_later`); until then the workers take no entry it covers received
//!   before it (`WorkerCache::pending_in_redis_covers`).
//! - Entries carry their writer's place in the purge log ([`Heard`]): a host refuses one
//!   that a purge by prefix or of everything it applied covers, written by a worker that had
//!   not applied it (its write may have landed after the purge's deletion; such purges are
//!   not deleted again by the hosts that hear them, unlike those by URL and tag).
//!
//! Fleet bound: each host makes at most one fetch per key at a time (coalescing), and a host
//! that finds the object in Redis makes none; so the origin sees one fetch per object per
//! freshness lifetime for the whole fleet, plus at most one per other host whose miss falls
//! inside the first fetch's round trip (there is no lock across hosts).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::doorbell::Doorbell;
use crate::redis::{Command, RedisLink, SMALL_REPLY_BYTES};

use super::fields::{span, Fields};
use super::{Object, Purge, PurgeTarget, Sent, Timing};
use crate::http::HeaderSpan;

/// The longest reply to a list command: a key's variant names (`LRANGE`, at most
/// [`MAX_REDIS_VARIANTS`]) and a purge's `SCAN` rounds ([`SCAN_COUNT`] keys asked for).
const MAX_LIST_REPLY_BYTES: usize = 8 << 20;

/// The longest reply to a `GET` of an entry: an entry of `max_entry_bytes` with its encoding's
/// overhead, and the bulk string's framing. Before, every command of the cache's link could
/// be answered with its longest reply, a list's 8 MiB at least: a `GET` could make the link
/// hold 8 MiB with the default `max_entry_bytes` of 1 MiB.
fn max_get_reply(max_entry_bytes: u64) -> usize {
    let entry = max_entry_bytes.saturating_add(MAX_ENCODING_OVERHEAD);
    usize::try_from(entry.saturating_add(BULK_FRAMING))
        .unwrap_or(usize::MAX)
        .min(crate::redis::MAX_REPLY_BYTES)
}

/// A bulk string's framing: `$`, its length (at most 20 digits), and two CR LF.
const BULK_FRAMING: u64 = 1 + 20 + 4;

/// Most fields, tags and Vary values accepted in an entry read back from Redis.
const MAX_ENTRY_FIELDS: usize = 512;
/// Most bytes an entry's encoding takes beyond its object's weight (`Object::weight`, which
/// `max_entry_bytes` bounds): the fixed part, and at most 8 bytes per field, tag and Vary
/// value ([`MAX_ENTRY_FIELDS`] of each).
const MAX_ENCODING_OVERHEAD: u64 = 128 + 3 * 8 * MAX_ENTRY_FIELDS as u64;
/// Most seconds an entry's response time may be ahead of this host's clock (hosts' clocks
/// are kept by NTP; see [`SharedLayer::get`]).
const MAX_CLOCK_AHEAD_SECS: u64 = 60;
/// Longest expiry given to an entry.
const MAX_TTL_SECS: u64 = 24 * 3600;
/// Kept beyond freshness and stale windows, so that a stale entry can still be validated.
const VALIDATION_SLACK_SECS: u64 = 60;
/// The entry format's tag. RWC2: a Vary value absent from the request is recorded as
/// `policy::VARY_ABSENT` (RWC1 recorded it as empty, like an empty field), so RWC1 entries are
/// refused (a miss) rather than matched the old way. RWC3: RWC2 with the purge log's place
/// its writer had reached ([`Heard`], after the flags) and a flag for a copy a soft purge
/// marked stale; an RWC2 entry is read as written before every purge
/// (`WorkerCache::wide_purge_covers`).
const MAGIC: &[u8; 4] = b"RWC3";
/// The tag of the entries of the builds before RWC3 (still read).
const MAGIC_RWC2: &[u8; 4] = b"RWC2";

/// The place in the purge log that a host's worker had reached when it wrote an entry: the
/// ID of the last purge of the log it had applied (or the log's place at the host's start,
/// when it had applied none since), `(0, 0)` when it knows none (and for an entry of an older
/// build). Every purge of the log up to it was applied by that worker before the write was
/// queued; a purge by prefix or of everything logged after it that covers the entry may have
/// been deleted in Redis before the write landed (`WorkerCache::wide_purge_covers`). IDs are
/// Redis's (the stream's, which only grow), never a host's clock.
pub type Heard = LogId;

/// Stores an entry with its index sets, and, when it varies, as its variant (RFC 9111 §4.1),
/// keeping the key's variant list within the cap. KEYS: the key's newest entry (`o:`), the
/// URL's index set (`u:`), the tags' index sets (`t:`, ARGV[3] of them), then, for a variant,
/// its key (`w:`) and the key's variant list (`v:`); ARGV: the entry, its expiry in seconds,
/// the number of tags, the variant cap (0: no variant). The list holds the variants' keys,
/// newest first; those past the cap are deleted. The URL's set lists the entry, the variant
/// and the list; a tag's set the entry and the variant.
///
/// One script (issue 12): before, the entry and its index sets were separate commands, so a
/// link that failed between them (or a round given up) could leave an entry no purge by URL
/// or tag finds, served again from Redis after the purge; and each set's expiry was set to
/// the entry's, so a later entry with a shorter life shortened it below the lives of the
/// entries it already listed (a tag's set lists many URLs), which then outlived their index
/// and escaped purges. A set's, and the list's, expiry is now only ever lengthened.
const PUT_LUA: &str = "local ttl = tonumber(ARGV[2]) local nt = tonumber(ARGV[3]) local cap = tonumber(ARGV[4]) local function keep(k) if redis.call('TTL', k) < ttl then redis.call('EXPIRE', k, ttl) end end redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl) local url = {KEYS[1]} local tag = {KEYS[1]} if cap > 0 then local vk = KEYS[3 + nt] local list = KEYS[4 + nt] redis.call('SET', vk, ARGV[1], 'EX', ttl) redis.call('LREM', list, 0, vk) redis.call('LPUSH', list, vk) local old = redis.call('LRANGE', list, cap, -1) for _, k in ipairs(old) do redis.call('DEL', k) end redis.call('LTRIM', list, 0, cap - 1) keep(list) url = {KEYS[1], vk, list} tag = {KEYS[1], vk} end redis.call('SADD', KEYS[2], unpack(url)) keep(KEYS[2]) for i = 3, 2 + nt do redis.call('SADD', KEYS[i], unpack(tag)) keep(KEYS[i]) end return 1";
/// Called once a purge's Redis copies are gone ([`SharedLayer::purge`]), with the ID the
/// purge log gave it when it was logged by that run (`None`: not logged, or given up).
pub type PurgeDone = Box<dyn FnOnce(Option<LogId>) + Send>;

/// Most purges a host keeps to send again to Redis ([`SharedLayer::unsent`]); past it they
/// are folded into one purge of everything ([`SharedLayer::keep_unsent`], counted in
/// [`SharedLayer::purges_given_up`]).
const MAX_UNSENT_PURGES: usize = 64;

/// What [`SharedLayer::update_entries`] makes of each entry it reads (`None`: left as it is).
type Update = Arc<dyn Fn(&Object) -> Option<Object> + Send + Sync>;

/// A Vary field name (lower case) and the request's value for it, as an object stores them.
type VaryValue = (Box<[u8]>, Vec<u8>);

/// Most variants kept per key in Redis, whatever the configured cap.
const MAX_REDIS_VARIANTS: usize = 256;

/// Removes every key listed in a set, then the set.
const PURGE_SET_LUA: &str = "local ks = redis.call('SMEMBERS', KEYS[1]) for _, k in ipairs(ks) do redis.call('DEL', k) end redis.call('DEL', KEYS[1]) return #ks";

/// Rewrites an entry only if it still holds what was read (a compare-and-set, so that an
/// entry another host wrote in between, possibly another representation, is left as it is):
/// KEYS[1] the entry, KEYS[2] its key's variant list, KEYS[3..] the index sets that list it;
/// ARGV: the bytes read, the new entry, its expiry in seconds. The list and the sets are kept
/// at least as long as the entry. Returns 1 when written.
pub const REWRITE_IF_UNCHANGED_LUA: &str = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) local ttl = tonumber(ARGV[3]) if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end for i = 3, #KEYS do redis.call('SADD', KEYS[i], KEYS[1]) if redis.call('TTL', KEYS[i]) < ttl then redis.call('EXPIRE', KEYS[i], ttl) end end return 1";

/// The shared layer: its link and counters.
pub struct SharedLayer {
    link: Arc<RedisLink>,
    prefix: Bytes,
    max_entry: u64,
    /// The longest reply to a `GET` of an entry ([`max_get_reply`]).
    max_get: usize,
    timeout: Duration,
    /// Lookups sent, entries found, entries written.
    pub gets: AtomicU64,
    pub found: AtomicU64,
    pub sets: AtomicU64,
    /// The tickets handed out ([`SharedLayer::purge_ticket`]; purges only, never a lookup)
    /// and not settled yet, and the next one: what each settlement tells the workers is
    /// settled below ([`SharedLayer::settled_below`]).
    tickets: Mutex<Tickets>,
    /// A settlement could not be posted to a worker (its control mailbox was full): the
    /// purge log's listener posts the workers [`SharedLayer::settled_below`] again
    /// ([`SharedLayer::settle_again`]). Before, the purges it settled stayed awaited on that
    /// worker, and its floor with them, until the process ended.
    settlements_lost: AtomicBool,
    /// `[cache.redis] purge_log_length`: most purges the purge log keeps.
    log_length: u64,
    /// `[cache.redis] purge_retry_first` and `purge_retry_max` ([`SharedLayer::retry_later`]).
    retry_first: Duration,
    retry_max: Duration,
    /// Purges whose Redis side failed (the link down, its queue full, an error answered):
    /// their copies in Redis may still be there and the other hosts did not hear them. Each
    /// is sent again, whole, when the link is up again after being down and before the next
    /// purge; at most [`MAX_UNSENT_PURGES`], oldest first. Before, such a purge was taken as
    /// done: the copies it was to delete came back from Redis once the link was up.
    unsent: Mutex<std::collections::VecDeque<Unsent>>,
    /// Purges whose Redis side failed (each failure of a purge sent again counts too), and
    /// those folded into a purge of everything because [`MAX_UNSENT_PURGES`] were kept.
    pub purges_failed: AtomicU64,
    pub purges_given_up: AtomicU64,
    /// The wait before the next try of the kept purges while the link stays up
    /// ([`SharedLayer::retry_later`]): `purge_retry_first`, doubled at each try asked for, at
    /// most `purge_retry_max`; the first again once a purge goes through and none is kept.
    retry_wait: Mutex<Duration>,
    /// The workers' control plane (set by the workers), to have them await the purge of
    /// everything that kept purges are folded into ([`SharedLayer::keep_unsent`]).
    control: std::sync::OnceLock<Arc<crate::control::Control>>,
    /// Purges this host read from the purge log (its own included), and the times the log
    /// had lost purges it had not read, so that it purged everything it stored ([`LogCursor`]).
    pub purges_heard: AtomicU64,
    pub purge_log_gaps: AtomicU64,
    /// Connections of the purge log's listener dropped because the log could not be read: an
    /// error answered, or a reply that is not one (malformed bytes, another shape).
    pub purge_log_errors: AtomicU64,
    /// Lines the listener logged about it (tests).
    purge_log_lines: AtomicU64,
}

/// The purge tickets of a host ([`SharedLayer::tickets`]).
struct Tickets {
    next: u64,
    /// Handed out, not settled yet: at most the purges kept ([`MAX_UNSENT_PURGES`]) and
    /// those on their way in the link's queue.
    open: std::collections::BTreeSet<u64>,
}

/// A purge kept to be sent again ([`SharedLayer::unsent`]): the purge, its ticket (see
/// [`SharedLayer::purge`]) and what to call once it went through.
struct Unsent {
    purge: Purge,
    ticket: Option<u64>,
    done: Option<PurgeDone>,
}

/// One purge's Redis side as its commands go: whether any failed, and what to call once the
/// last is answered ([`PurgeRun::finish`]).
struct PurgeRun {
    layer: Arc<SharedLayer>,
    purge: Purge,
    ticket: Option<u64>,
    /// [`RedisLink::ups`] before its first command was queued: a failed run kept once the
    /// link came up since may have missed the link's `on_up` ([`SharedLayer::keep_unsent`]).
    ups: u64,
    failed: AtomicBool,
    done: Mutex<Option<PurgeDone>>,
    /// Logged for the other hosts once its copies are deleted; false for a host's deletion
    /// of the copies of a purge it heard ([`SharedLayer::delete_heard`]).
    log: bool,
}

impl PurgeRun {
    /// Notes a command's answer: none (the link failed it, or refused it) or an error is a
    /// failure of the purge.
    fn note(&self, f: &Option<BytesFrame>) {
        if matches!(f, None | Some(BytesFrame::Error(_))) {
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    /// The purge's last command (its publication) is answered: done, or kept to be sent again.
    fn finish(&self, f: Option<BytesFrame>) {
        self.note(&f);
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        if self.failed.load(Ordering::Relaxed) && !self.log {
            // A heard purge's second deletion is not kept: the purging host keeps its own,
            // and keeping this one would log it again on every host whose Redis fails.
            self.layer.settle(self.ticket, done, None);
        } else if self.failed.load(Ordering::Relaxed) {
            self.layer.keep_unsent(Unsent {
                purge: self.purge.clone(),
                ticket: self.ticket,
                done,
            });
            // The link came up while this run's commands were refused or failed: its
            // `on_up` took the kept purges before this one was kept (a command refused on a
            // worker as the link came up, or a publication answered once it was up after a
            // deletion refused), and would leave it until the next purge or the next time the
            // link is down and up. Checked after keeping it: `on_up` counts before it takes.
            let link = self.layer.link();
            if link.ups() != self.ups && !link.is_down() {
                link.run_on_up_again();
            }
            self.layer.retry_later();
        } else {
            self.layer.went_through();
            // The log's answer: the purge's ID (a PING's answer is none).
            let logged = match &f {
                Some(BytesFrame::BulkString(id)) if self.log => parse_log_id(id),
                _ => None,
            };
            self.layer.settle(self.ticket, done, logged);
        }
    }
}

impl SharedLayer {
    /// The layer for `[cache.redis]`, if configured (its thread is started by the server).
    pub fn new(cfg: &crate::config::Config) -> Option<Arc<SharedLayer>> {
        let r = cfg.cache.redis.as_ref()?;
        Some(Arc::new(SharedLayer {
            link: RedisLink::with_role(r.link(), "cache"),
            prefix: Bytes::copy_from_slice(r.key_prefix.as_bytes()),
            max_entry: r.max_entry_bytes.0,
            max_get: max_get_reply(r.max_entry_bytes.0),
            timeout: r.timeout.0,
            gets: AtomicU64::new(0),
            found: AtomicU64::new(0),
            sets: AtomicU64::new(0),
            tickets: Mutex::new(Tickets {
                next: 0,
                open: std::collections::BTreeSet::new(),
            }),
            settlements_lost: AtomicBool::new(false),
            log_length: r.purge_log_length,
            retry_first: r.purge_retry_first.0,
            retry_max: r.purge_retry_max(),
            unsent: Mutex::new(std::collections::VecDeque::new()),
            purges_failed: AtomicU64::new(0),
            purges_given_up: AtomicU64::new(0),
            retry_wait: Mutex::new(r.purge_retry_first.0),
            control: std::sync::OnceLock::new(),
            purges_heard: AtomicU64::new(0),
            purge_log_gaps: AtomicU64::new(0),
            purge_log_errors: AtomicU64::new(0),
            purge_log_lines: AtomicU64::new(0),
        }))
        .inspect(|l| {
            // The purges that failed while the link was down go again once it is up.
            let weak = Arc::downgrade(l);
            l.link.on_up(Box::new(move || {
                if let Some(l) = weak.upgrade() {
                    l.send_unsent();
                }
            }));
        })
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    /// The workers' control plane, for [`SharedLayer::keep_unsent`]; set once.
    pub fn set_control(&self, c: Arc<crate::control::Control>) {
        let _ = self.control.set(c);
    }

    fn rkey(&self, kind: &[u8], key: &[u8]) -> Bytes {
        let mut k = Vec::with_capacity(self.prefix.len() + kind.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(kind);
        k.extend_from_slice(key);
        k.into()
    }

    /// The Redis key of the variant of `key` that `head` selects, among variants that vary on
    /// the fields `stored` names (the Vary values of a variant of the key; only the names are
    /// read). See [`variant_id`].
    fn variant_rkey(&self, key: &[u8], stored: &[VaryValue], req: &Sent<'_>) -> Bytes {
        let values: Vec<(&[u8], Vec<u8>)> = stored
            .iter()
            .map(|(n, _)| (&n[..], req.vary_value(n)))
            .collect();
        let id = variant_id(key, values.iter().map(|(n, v)| (*n, &v[..])));
        self.rkey(b"w:", &id)
    }

    /// The variant of each of `keys` that `head` selects (§4.1), in order, with the place in
    /// the purge log its writer had reached ([`Heard`]) (`None`: absent, bad, or no answer
    /// within the timeout). `known[i]`: a variant of `keys[i]` this worker
    /// holds, whose Vary field names name the request's variant at once (one round trip);
    /// otherwise a second round trip asks for the variant that `o:<key>` names, when it is
    /// not the request's. The task sleeps on the worker's doorbell until every answer is in
    /// or the timeout passes (no polling).
    pub async fn get(
        &self,
        bell: &Doorbell,
        keys: &[&[u8]],
        known: &[Option<&Object>],
        head: &Sent<'_>,
        others: &mut bool,
    ) -> Vec<Option<(Object, Heard)>> {
        let deadline = Instant::now() + self.timeout;
        let mut asked: Vec<(usize, Bytes)> = Vec::with_capacity(keys.len() * 2);
        for (i, k) in keys.iter().enumerate() {
            asked.push((i, self.rkey(b"o:", k)));
            if let Some(o) = known
                .get(i)
                .copied()
                .flatten()
                .filter(|o| !o.vary.is_empty())
            {
                asked.push((i, self.variant_rkey(k, &o.vary, head)));
            }
        }
        let mut out: Vec<Option<(Object, Heard)>> = keys.iter().map(|_| None).collect();
        let mut again: Vec<(usize, Bytes)> = Vec::new();
        let raw = self.get_raw(bell, asked.iter().map(|(_, k)| k.clone()), deadline);
        // Each entry decoded from a copy of its own: the answer is a slice of the link's read
        // buffer, which an object kept in the store would otherwise hold whole (bytes its
        // weight does not count).
        //
        // An entry is never taken as received after now (RFC 9111 §4.2.3: `current_age` adds
        // the time since it was received, and a response time ahead of the clock would hold
        // its age still, fresh and with the same `Age`, for as long as it is ahead): one more
        // than [`MAX_CLOCK_AHEAD_SECS`] ahead is refused (a miss), one less is taken as
        // received now (the writer's clock a little ahead).
        let now = super::now_secs();
        let own = |b: Bytes| {
            let (mut o, heard) = decode_heard(&Bytes::copy_from_slice(&b))?;
            if o.t.response_time > now.saturating_add(MAX_CLOCK_AHEAD_SECS) {
                return None;
            }
            o.t.response_time = o.t.response_time.min(now);
            Some((o, heard))
        };
        for ((i, _), b) in asked.iter().zip(raw.await) {
            let Some((o, heard)) = b.and_then(own) else {
                continue;
            };
            if out[*i].is_some() {
                continue;
            }
            if o.vary_matches(head) {
                out[*i] = Some((o, heard));
            } else if !o.vary.is_empty() {
                *others = true;
                let rk = self.variant_rkey(keys[*i], &o.vary, head);
                if !asked.iter().chain(&again).any(|(j, k)| j == i && *k == rk) {
                    again.push((*i, rk));
                }
            }
        }
        again.retain(|(i, _)| out[*i].is_none());
        if !again.is_empty() && Instant::now() < deadline {
            let raw = self.get_raw(bell, again.iter().map(|(_, k)| k.clone()), deadline);
            for ((i, _), b) in again.iter().zip(raw.await) {
                if out[*i].is_none() {
                    out[*i] = b.and_then(own).filter(|(o, _)| o.vary_matches(head));
                }
            }
        }
        let found = out.iter().filter(|o| o.is_some()).count() as u64;
        self.found.fetch_add(found, Ordering::Relaxed);
        out
    }

    /// The values stored under `rkeys`, in order (`None`: absent, not a string, or no answer
    /// by `deadline`).
    async fn get_raw(
        &self,
        bell: &Doorbell,
        rkeys: impl ExactSizeIterator<Item = Bytes>,
        deadline: Instant,
    ) -> Vec<Option<Bytes>> {
        type Slot = Arc<Mutex<(usize, Vec<Option<Bytes>>)>>;
        let n = rkeys.len();
        let slot: Slot = Arc::new(Mutex::new((0, vec![None; n])));
        bell.join(&self.link.doorbells);
        // Counted as a waiter before the commands go: an answer that beats the first look
        // still rings (one wake-up, found done).
        let _counted = bell.watch();
        // The link throws away an answer longer than the `GET`'s bound as it reads it (a
        // miss); one within the bound's framing room but longer than any entry this host
        // writes is dropped here, as it arrives.
        let longest = self.max_entry.saturating_add(MAX_ENCODING_OVERHEAD);
        for (i, k) in rkeys.enumerate() {
            self.gets.fetch_add(1, Ordering::Relaxed);
            let s = slot.clone();
            self.link.command(Command {
                args: vec![Bytes::from_static(b"GET"), k],
                max_reply: self.max_get,
                // A read.
                repeatable: true,
                done: Some(Box::new(move |f| {
                    let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
                    g.0 += 1;
                    if let Some(BytesFrame::BulkString(b)) = f {
                        if b.len() as u64 > longest {
                            return;
                        }
                        if let Some(v) = g.1.get_mut(i) {
                            *v = Some(b);
                        }
                    }
                })),
            });
        }
        bell.wait_until(deadline, || slot.lock().map_or(n, |g| g.0) >= n)
            .await;
        let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut g.1)
    }

    /// Writes `obj` under `key` (queued; nobody waits for it): as the key's newest entry, and,
    /// when it varies, as its variant too, keeping at most `max_variants` of them (§4.1), with
    /// the index sets that purges by URL and by tag find it through, all in one script
    /// ([`PUT_LUA`]). `heard`: the writing worker's place in the purge log ([`Heard`]).
    pub fn put(&self, key: &[u8], obj: &Object, now: u64, max_variants: usize, heard: Heard) {
        if obj.weight() > self.max_entry {
            return;
        }
        let ttl_s = Bytes::from(expiry(obj, now).to_string());
        let entry = Bytes::from(encode_heard(obj, heard));
        self.sets.fetch_add(1, Ordering::Relaxed);
        let variant = !obj.vary.is_empty();
        let keys = 2 + obj.tags.len() + if variant { 2 } else { 0 };
        let mut args = Vec::with_capacity(3 + keys + 4);
        args.extend([
            Bytes::from_static(b"EVAL"),
            Bytes::from_static(PUT_LUA.as_bytes()),
            Bytes::from(keys.to_string()),
            self.rkey(b"o:", key),
            self.rkey(b"u:", &obj.url),
        ]);
        args.extend(obj.tags.iter().map(|t| self.rkey(b"t:", t)));
        let cap = if variant {
            let id = variant_id(key, obj.vary.iter().map(|(n, v)| (&n[..], &v[..])));
            args.extend([self.rkey(b"w:", &id), self.rkey(b"v:", key)]);
            max_variants.clamp(1, MAX_REDIS_VARIANTS)
        } else {
            0
        };
        args.extend([
            entry,
            ttl_s,
            Bytes::from(obj.tags.len().to_string()),
            Bytes::from(cap.to_string()),
        ]);
        self.link.command(Command {
            args,
            max_reply: SMALL_REPLY_BYTES,
            // The same values again; `LREM` before `LPUSH`: run again, the list ends as it
            // did.
            repeatable: true,
            done: None,
        });
    }

    /// Rewrites the entries of `key` in Redis (its newest entry and every listed variant)
    /// that `update` gives a new object for: read, updated and written back on the link's
    /// thread (queued; nobody waits for it), each only if unchanged since it was read. For
    /// RFC 9111 §4.3.4, the variants a 304 selects that only Redis holds.
    pub fn update_entries(
        self: &Arc<Self>,
        key: &[u8],
        now: u64,
        update: impl Fn(&Object) -> Option<Object> + Send + Sync + 'static,
    ) {
        let layer = self.clone();
        let update: Update = Arc::new(update);
        let list = self.rkey(b"v:", key);
        let newest = self.rkey(b"o:", key);
        self.link.command(Command {
            args: vec![
                Bytes::from_static(b"LRANGE"),
                list.clone(),
                Bytes::from_static(b"0"),
                Bytes::from((MAX_REDIS_VARIANTS - 1).to_string()),
            ],
            max_reply: MAX_LIST_REPLY_BYTES,
            // A read.
            repeatable: true,
            done: Some(Box::new(move |f| {
                let listed = match f {
                    Some(BytesFrame::Array(items)) => items,
                    _ => Vec::new(),
                };
                // Only names this layer writes (`w:` under its prefix), at most the cap.
                let variant_prefix = layer.rkey(b"w:", b"");
                let variants =
                    listed
                        .into_iter()
                        .take(MAX_REDIS_VARIANTS)
                        .filter_map(|i| match i {
                            BytesFrame::BulkString(k) if k.starts_with(&variant_prefix) => Some(k),
                            _ => None,
                        });
                for rk in std::iter::once(newest).chain(variants) {
                    layer.rewrite_entry(rk, list.clone(), now, update.clone());
                }
            })),
        });
    }

    /// One entry of [`SharedLayer::update_entries`]: read, updated, written back if unchanged.
    fn rewrite_entry(self: &Arc<Self>, rk: Bytes, list: Bytes, now: u64, update: Update) {
        let layer = self.clone();
        let longest = self.max_entry.saturating_add(MAX_ENCODING_OVERHEAD);
        self.link.command(Command {
            args: vec![Bytes::from_static(b"GET"), rk.clone()],
            max_reply: self.max_get,
            // A read.
            repeatable: true,
            done: Some(Box::new(move |f| {
                let Some(BytesFrame::BulkString(old)) = f else {
                    return;
                };
                if old.len() as u64 > longest {
                    return;
                }
                // The entry's place in the purge log is kept: its content is the writer's.
                let Some((new, heard)) = decode_heard(&Bytes::copy_from_slice(&old))
                    .and_then(|(o, heard)| Some((update(&o)?, heard)))
                else {
                    return;
                };
                if new.weight() > layer.max_entry {
                    return;
                }
                let mut args = vec![
                    Bytes::from_static(b"EVAL"),
                    Bytes::from_static(REWRITE_IF_UNCHANGED_LUA.as_bytes()),
                    Bytes::from((2 + 1 + new.tags.len()).to_string()),
                    rk,
                    list,
                    layer.rkey(b"u:", &new.url),
                ];
                args.extend(new.tags.iter().map(|t| layer.rkey(b"t:", t)));
                args.extend([
                    old,
                    Bytes::from(encode_heard(&new, heard)),
                    Bytes::from(expiry(&new, now).to_string()),
                ]);
                layer.sets.fetch_add(1, Ordering::Relaxed);
                layer.link.command(Command {
                    args,
                    max_reply: SMALL_REPLY_BYTES,
                    // A compare-and-set: run again, it finds its own write, not what was read, and writes
                    // nothing.
                    repeatable: true,
                    done: None,
                });
            })),
        });
    }

    /// Deletes the Redis copies a purge names and tells every host (through the purge channel).
    /// By URL or tag: the keys its index set lists. By prefix: the index sets of every URL
    /// under it, and everything: every key this layer writes, both found by `SCAN` a round at
    /// a time on the link (no round blocks Redis longer than one `SCAN` and its deletions).
    /// Without that, a host's next local miss after a purge found the purged object in Redis
    /// and stored it again. The purge is published once the copies are gone, so that no host
    /// takes one back from Redis after hearing it. `done` is called once the copies are gone
    /// (the publication's answer, which Redis sends after the deletions': one connection, in
    /// order), or once the link failed them.
    ///
    /// A purge whose Redis side fails is kept and sent again ([`SharedLayer::unsent`]);
    /// `done` is then called once it went through, or once it is given up.
    ///
    /// `ticket` is the purge's [`SharedLayer::purge_ticket`] (under which the workers await
    /// it; `done` settles it), when it has one.
    ///
    /// The kept purges go before it, unless their retry is on the timer
    /// ([`SharedLayer::retry_later`]): Redis then answered them with errors, and sending all
    /// of them again with every new purge (an invalidation at each unsafe request) sent a
    /// failing Redis up to 64 purges for each new one, beside the backoff. They go at the
    /// timer, or at once when a purge goes through ([`SharedLayer::went_through`]).
    pub fn purge(self: &Arc<Self>, p: &Purge, ticket: Option<u64>, done: Option<PurgeDone>) {
        if !self.link.is_down() && !self.link.on_up_at_pending() {
            self.send_unsent();
        }
        self.send_purge(p.clone(), ticket, done);
    }

    /// Keeps a purge whose Redis side failed, to send it again. One equal to a purge already
    /// kept, with a later ticket, replaces it (sent once, it does what both would): the
    /// invalidations of one URL by repeated unsafe requests while Redis is down take one
    /// place, not one each. The one replaced is settled with the later one, not before: a
    /// worker whose control mailbox was full when the later one was posted never noted it,
    /// and settling the earlier at once ended that worker's wait for a purge whose Redis side
    /// was not done (RFC 9111 §4.4: a copy it deletes could then be taken from Redis again).
    ///
    /// Past [`MAX_UNSENT_PURGES`], every kept purge and this one are folded into one hard
    /// purge of everything, kept in their place (issue 12): it deletes in Redis whatever they
    /// would have, and every host that reads it drops its stores. The workers first note it
    /// as awaited (posted past their mailboxes' cap: it must reach them), so that until it
    /// went through none takes an entry from Redis received before it; then the folded
    /// purges are done (their `done` called, counted in [`SharedLayer::purges_given_up`]).
    /// Before, the oldest was given up: its copies stayed in Redis and could come back, and
    /// the other hosts never heard it.
    fn keep_unsent(self: &Arc<Self>, mut u: Unsent) {
        self.purges_failed.fetch_add(1, Ordering::Relaxed);
        let mut q = self.unsent.lock().unwrap_or_else(|e| e.into_inner());
        let replaced = q
            .iter()
            .position(|k| k.purge == u.purge && k.ticket < u.ticket)
            .and_then(|i| q.remove(i));
        if let Some(k) = replaced {
            // Settled when the later one is (its ticket closed, then its `done`), whichever
            // way that goes: sent, or folded into a purge of everything.
            let layer = Arc::downgrade(self);
            let later = u.done.take();
            u.done = Some(Box::new(move |logged| {
                // The earlier is not the one logged: the later covers what it did, and more.
                match layer.upgrade() {
                    Some(l) => l.settle(k.ticket, k.done, None),
                    None => {
                        if let Some(d) = k.done {
                            d(None);
                        }
                    }
                }
                if let Some(d) = later {
                    d(logged);
                }
            }));
            q.push_back(u);
            return;
        }
        if q.len() < MAX_UNSENT_PURGES {
            q.push_back(u);
            return;
        }
        let all = Purge {
            target: PurgeTarget::All,
            soft: false,
        };
        let ticket = self.purge_ticket();
        let control = self.control.get().cloned();
        if let Some(c) = &control {
            for i in 0..c.workers() {
                let p = all.clone();
                let _ = c.post_every(
                    i,
                    Box::new(move |w| w.cache.note_redis_pending(Some(ticket), &p)),
                );
            }
        }
        let done = control.map(|c| self.settlement(c, ticket));
        let folded: Vec<Unsent> = q.drain(..).chain(std::iter::once(u)).collect();
        q.push_back(Unsent {
            purge: all,
            ticket: Some(ticket),
            done,
        });
        drop(q);
        self.purges_given_up
            .fetch_add(folded.len() as u64, Ordering::Relaxed);
        for k in folded {
            self.settle(k.ticket, k.done, None);
        }
    }

    /// Asks the link to send the kept purges again later, when it is up: a purge that failed
    /// while the link stayed up (Redis answered an error, such as `READONLY` from a replica
    /// after a failover or `NOREPLICAS`; the queue was full) would otherwise wait for the next
    /// purge or for the link to go down and up, which may never come, its copies left in Redis
    /// and the other hosts not told. One timer for all of them: the first try
    /// `purge_retry_first` after the failure, each next one twice as late, at most
    /// `purge_retry_max`. A link that is down sends them once it is up (`on_up`).
    fn retry_later(&self) {
        if self.link.is_down() {
            return;
        }
        let mut wait = self.retry_wait.lock().unwrap_or_else(|e| e.into_inner());
        if self.link.run_on_up_at(Instant::now() + *wait) {
            *wait = wait.saturating_mul(2).min(self.retry_max);
        }
    }

    /// A purge went through: with none kept, the next failure waits `purge_retry_first`;
    /// with some kept, Redis takes purges again, and they go now rather than at the timer.
    fn went_through(&self) {
        if self.unsent_purges() == 0 {
            *self.retry_wait.lock().unwrap_or_else(|e| e.into_inner()) = self.retry_first;
        } else if !self.link.is_down() {
            self.link.run_on_up_again();
        }
    }

    /// Sends again every purge kept ([`SharedLayer::unsent`]), oldest first; one that fails
    /// again is kept again.
    fn send_unsent(self: &Arc<Self>) {
        let q = std::mem::take(&mut *self.unsent.lock().unwrap_or_else(|e| e.into_inner()));
        for u in q {
            self.send_purge(u.purge, u.ticket, u.done);
        }
    }

    /// Purges kept to be sent again (tests, figures).
    pub fn unsent_purges(&self) -> usize {
        self.unsent.lock().map_or(0, |q| q.len())
    }

    fn send_purge(self: &Arc<Self>, p: Purge, ticket: Option<u64>, done: Option<PurgeDone>) {
        self.send_purge_run(p, ticket, done, true);
    }

    /// Deletes again the Redis copies of a purge by URL or tag heard from the purge log, once
    /// this host's workers applied it, without logging it (RFC 9111 §4.4): a copy one of them
    /// stored before it applied the purge, whose write was still queued on this host's link as
    /// the purging host deleted the copies, reached Redis after that deletion, and every host
    /// took it back from there (found by `tests/fuzz_cache_redis.rs`). This deletion goes on
    /// the same link after that write. Purges by prefix and of everything are not deleted
    /// again (a `SCAN` of the keys on every host for each): the entries carry their writer's
    /// place in the log ([`Heard`]), and one written before the writer applied such a purge
    /// that covers it is refused (`WorkerCache::wide_purge_covers`). `ticket` and `done` as for
    /// [`SharedLayer::purge`]; a failure is not kept, only settled.
    pub fn delete_heard(self: &Arc<Self>, p: &Purge, ticket: Option<u64>, done: Option<PurgeDone>) {
        if matches!(p.target, PurgeTarget::Url(_) | PurgeTarget::Tag(_)) {
            self.send_purge_run(p.clone(), ticket, done, false);
        } else {
            self.settle(ticket, done, None);
        }
    }

    fn send_purge_run(
        self: &Arc<Self>,
        p: Purge,
        ticket: Option<u64>,
        done: Option<PurgeDone>,
        log: bool,
    ) {
        let run = Arc::new(PurgeRun {
            layer: self.clone(),
            purge: p,
            ticket,
            ups: self.link.ups(),
            failed: AtomicBool::new(false),
            done: Mutex::new(done),
            log,
        });
        let p = &run.purge;
        let set = match &p.target {
            PurgeTarget::Url(u) => self.rkey(b"u:", u),
            PurgeTarget::Tag(t) => self.rkey(b"t:", t),
            PurgeTarget::Prefix(x) => {
                let sets = self.rkey(b"u:", x);
                let scan = Scan {
                    pattern: glob_prefix(&sets),
                    keep: sets,
                    found: ScanFound::IndexSets,
                    then: Bytes::from(encode_purge(p)),
                };
                self.purge_scan(Arc::new(scan), Bytes::from_static(b"0"), 0, run.clone());
                return;
            }
            PurgeTarget::All => {
                let scan = Scan {
                    pattern: glob_prefix(&self.prefix),
                    keep: self.prefix.clone(),
                    found: ScanFound::Entries,
                    then: Bytes::from(encode_purge(p)),
                };
                self.purge_scan(Arc::new(scan), Bytes::from_static(b"0"), 0, run.clone());
                return;
            }
        };
        self.purge_set(set, &run);
        // Sent after the deletion on the same connection: Redis runs them in order.
        self.publish(Bytes::from(encode_purge(p)), run.clone());
    }

    /// A number for a purge sent to Redis, unique on this host (see
    /// `WorkerCache::note_redis_pending`), open until the purge is settled
    /// ([`SharedLayer::settle`]).
    pub fn purge_ticket(&self) -> u64 {
        let mut t = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.next;
        t.next += 1;
        t.open.insert(n);
        n
    }

    /// Every ticket below this one is settled: its purge is done in Redis, or was given up
    /// (folded into a purge of everything, awaited under a ticket of its own, see
    /// [`SharedLayer::keep_unsent`]). Tickets are handed out and closed under one lock, so
    /// that none below it is handed out after it is read.
    pub fn settled_below(&self) -> u64 {
        let t = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        t.open.first().copied().unwrap_or(t.next)
    }

    /// The purge under `ticket` is done in Redis, or given up: its ticket is closed, then
    /// `done` called (which tells the workers, [`SharedLayer::settlement`]) with the ID the
    /// purge log gave it (`logged`), when it was logged.
    fn settle(&self, ticket: Option<u64>, done: Option<PurgeDone>, logged: Option<LogId>) {
        if let Some(n) = ticket {
            let mut t = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
            t.open.remove(&n);
        }
        if let Some(d) = done {
            d(logged);
        }
    }

    /// What tells every worker that the purge under `ticket` is settled
    /// (`WorkerCache::settle_redis_purge`), and that every ticket below
    /// [`SharedLayer::settled_below`] is (`WorkerCache::settle_redis_below`): a settlement a
    /// full control mailbox refused is made up for by the next one that reaches the worker,
    /// or by the purge log's listener, which posts it again ([`SharedLayer::settle_again`]).
    /// Before, the purge stayed awaited on that worker until the process ended, and so did
    /// the worker's floor once the purge was on it: no entry received before it was taken
    /// from Redis again.
    pub fn settlement(
        self: &Arc<Self>,
        control: Arc<crate::control::Control>,
        ticket: u64,
    ) -> PurgeDone {
        let layer = Arc::downgrade(self);
        Box::new(move |logged| {
            let Some(l) = layer.upgrade() else { return };
            let below = l.settled_below();
            for i in 0..control.workers() {
                let posted = control.post(
                    i,
                    Box::new(move |w| {
                        w.cache.settle_redis_purge(ticket, logged);
                        w.cache.settle_redis_below(below);
                    }),
                );
                if matches!(posted, Err(crate::control::ControlError::Full(_))) {
                    l.settlements_lost.store(true, Ordering::Release);
                }
            }
        })
    }

    /// After a settlement was lost ([`SharedLayer::settlement`]), posts every worker
    /// [`SharedLayer::settled_below`] again; one that is still refused is tried again at the
    /// next call. Called by the purge log's listener at each of its rounds (one `XREAD
    /// BLOCK` of 2 s and its reply while Redis answers), and every 50 ms between its tries
    /// while Redis does not answer.
    fn settle_again(&self, control: &crate::control::Control) {
        if !self.settlements_lost.swap(false, Ordering::AcqRel) {
            return;
        }
        let below = self.settled_below();
        for i in 0..control.workers() {
            let posted = control.post(i, Box::new(move |w| w.cache.settle_redis_below(below)));
            if matches!(posted, Err(crate::control::ControlError::Full(_))) {
                self.settlements_lost.store(true, Ordering::Release);
            }
        }
    }

    /// Deletes the keys an index set names, then the set ([`PURGE_SET_LUA`]).
    fn purge_set(&self, set: Bytes, run: &Arc<PurgeRun>) {
        let run = run.clone();
        self.link.command(Command {
            args: vec![
                Bytes::from_static(b"EVAL"),
                Bytes::from_static(PURGE_SET_LUA.as_bytes()),
                Bytes::from_static(b"1"),
                set,
            ],
            max_reply: SMALL_REPLY_BYTES,
            // Deletes: run again, it deletes what was indexed since, as a purge a moment later would.
            repeatable: true,
            done: Some(Box::new(move |f| run.note(&f))),
        });
    }

    /// Publishes a purge, the last of its commands: appends it to the purge log, which every
    /// host follows ([`LogCursor`]), and publishes it on the channel (hosts of earlier
    /// versions listen there), by [`PURGE_LOG_LUA`]. Its run is finished with the answer (or
    /// the link's failure).
    fn publish(&self, msg: Bytes, run: Arc<PurgeRun>) {
        if !run.log {
            // Not logged: finished once the deletions before it are answered.
            self.link.command(Command {
                args: vec![Bytes::from_static(b"PING")],
                max_reply: SMALL_REPLY_BYTES,
                repeatable: true,
                done: Some(Box::new(move |f| run.finish(f))),
            });
            return;
        }
        let msg = log_message(msg);
        self.link.command(Command {
            args: vec![
                Bytes::from_static(b"EVAL"),
                Bytes::from_static(PURGE_LOG_LUA.as_bytes()),
                Bytes::from_static(b"3"),
                self.rkey(b"purge-log", b""),
                self.rkey(b"purge-log-trimmed", b""),
                self.rkey(b"purge", b""),
                msg,
                Bytes::from(self.log_length.to_string()),
            ],
            max_reply: SMALL_REPLY_BYTES,
            // Logged twice, a purge is applied twice: the second finds only what was stored
            // since, as a purge a moment later would.
            repeatable: true,
            done: Some(Box::new(move |f| run.finish(f))),
        });
    }

    /// One `SCAN` round of a purge by prefix or of everything: deletes what it finds, then
    /// asks for the next round, until Redis says the scan is over (or it fails, or after
    /// [`MAX_SCAN_ROUNDS`]); then publishes the purge.
    fn purge_scan(
        self: &Arc<Self>,
        scan: Arc<Scan>,
        cursor: Bytes,
        round: u32,
        run: Arc<PurgeRun>,
    ) {
        let layer = self.clone();
        self.link.command(Command {
            args: vec![
                Bytes::from_static(b"SCAN"),
                cursor,
                Bytes::from_static(b"MATCH"),
                scan.pattern.clone(),
                Bytes::from_static(b"COUNT"),
                Bytes::from_static(SCAN_COUNT),
            ],
            max_reply: MAX_LIST_REPLY_BYTES,
            // A read (its cursor is kept in the command).
            repeatable: true,
            done: Some(Box::new(move |f| {
                let next = match f {
                    Some(BytesFrame::Array(v)) => match <[BytesFrame; 2]>::try_from(v) {
                        Ok([BytesFrame::BulkString(next), BytesFrame::Array(keys)]) => {
                            layer.delete_found(&scan, keys, &run);
                            Some(next)
                        }
                        _ => None,
                    },
                    _ => None,
                };
                // A scan cut short leaves copies in Redis: the purge is sent again (and still
                // published now, for the other hosts' stores).
                if next.is_none() {
                    run.note(&None);
                }
                // A cursor is a decimal number; "0" ends the scan.
                let more = next.filter(|n| {
                    &n[..] != b"0" && n.len() <= 20 && n.iter().all(u8::is_ascii_digit)
                });
                match more {
                    Some(n) if round + 1 < MAX_SCAN_ROUNDS => {
                        layer.purge_scan(scan, Bytes::copy_from_slice(&n), round + 1, run)
                    }
                    _ => layer.publish(scan.then.clone(), run),
                }
            })),
        });
    }

    /// Deletes what one `SCAN` round found: only keys under the scan's literal prefix (a
    /// pattern's match, checked again), and of everything only the kinds this layer writes.
    fn delete_found(&self, scan: &Scan, keys: Vec<BytesFrame>, run: &Arc<PurgeRun>) {
        let keys = keys.into_iter().filter_map(|k| match k {
            BytesFrame::BulkString(k) if k.starts_with(&scan.keep) => {
                Some(Bytes::copy_from_slice(&k))
            }
            _ => None,
        });
        match scan.found {
            ScanFound::IndexSets => {
                for set in keys {
                    self.purge_set(set, run);
                }
            }
            ScanFound::Entries => {
                let mut args = vec![Bytes::from_static(b"DEL")];
                args.extend(keys.filter(|k| {
                    let kind = k.get(self.prefix.len()..self.prefix.len() + 2);
                    kind.is_some_and(|kind| ENTRY_KINDS.contains(&kind))
                }));
                if args.len() > 1 {
                    let run = run.clone();
                    self.link.command(Command {
                        args,
                        max_reply: SMALL_REPLY_BYTES,
                        repeatable: true,
                        done: Some(Box::new(move |f| run.note(&f))),
                    });
                }
            }
        }
    }
}

/// Keys asked for per `SCAN` round of a purge by prefix or of everything.
const SCAN_COUNT: &[u8] = b"100";
/// Most `SCAN` rounds of one purge (a server that never ends its scan cannot keep the link
/// busy for ever): ten million keys or more at [`SCAN_COUNT`] a round.
const MAX_SCAN_ROUNDS: u32 = 100_000;
/// The kinds of key this layer writes after its prefix (entries, variants, variant lists,
/// index sets by URL and by tag); a purge of everything deletes those and nothing else that
/// shares the prefix (a rate limiter's buckets, say).
const ENTRY_KINDS: [&[u8]; 5] = [b"o:", b"w:", b"v:", b"u:", b"t:"];

/// A purge by prefix or of everything, as its `SCAN` rounds go.
struct Scan {
    /// The `MATCH` pattern: [`Scan::keep`], escaped, then `*`.
    pattern: Bytes,
    /// What every key found must start with.
    keep: Bytes,
    found: ScanFound,
    /// The purge message, published once the scan is over.
    then: Bytes,
}

#[derive(Clone, Copy)]
enum ScanFound {
    /// Index sets of URLs: each is purged (its keys, then itself).
    IndexSets,
    /// Keys deleted as they are.
    Entries,
}

/// A `SCAN MATCH` pattern for the keys that start with `literal`: its glob characters
/// escaped with a backslash, then `*`.
fn glob_prefix(literal: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(literal.len() + 8);
    for &c in literal {
        if matches!(c, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(c);
    }
    out.push(b'*');
    out.into()
}

/// How long Redis keeps an entry: its freshness left, its stale windows, and time to validate
/// it once stale, at most [`MAX_TTL_SECS`].
fn expiry(obj: &Object, now: u64) -> u64 {
    obj.t
        .lifetime
        .saturating_sub(obj.t.age(now))
        .saturating_add(obj.t.swr.max(obj.t.sie))
        .saturating_add(VALIDATION_SLACK_SECS)
        .min(MAX_TTL_SECS)
}

/// A variant's name after `w:`: the cache key and the variant's Vary field names and values,
/// each length-prefixed, so that no two (key, variant) pairs share a name.
fn variant_id<'a>(key: &[u8], vary: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut id = Vec::with_capacity(key.len() + 64);
    put_lv(&mut id, key);
    for (n, v) in vary {
        put_lv(&mut id, n);
        put_lv(&mut id, v);
    }
    id
}

/// Most bytes of a purge message read from the channel.
const MAX_PURGE_MESSAGE: usize = 64 * 1024;

/// The message logged for a purge: its own, or, when longer than the listeners read
/// ([`MAX_PURGE_MESSAGE`]: a URL or prefix that long, which `limits.max_uri_bytes` allows),
/// a hard purge of everything: the safe side, where a message no listener reads would stop
/// every host's listener at it.
fn log_message(msg: Bytes) -> Bytes {
    if msg.len() <= MAX_PURGE_MESSAGE {
        return msg;
    }
    Bytes::from(encode_purge(&Purge {
        target: PurgeTarget::All,
        soft: false,
    }))
}

/// A purge as it travels on the channel: its kind, hard or soft, and its argument.
pub fn encode_purge(p: &Purge) -> Vec<u8> {
    let (kind, arg): (u8, &[u8]) = match &p.target {
        PurgeTarget::Url(u) => (b'u', u),
        PurgeTarget::Prefix(x) => (b'p', x),
        PurgeTarget::Tag(t) => (b't', t),
        PurgeTarget::All => (b'a', b""),
    };
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(kind);
    out.push(u8::from(p.soft));
    out.extend_from_slice(arg);
    out
}

pub fn decode_purge(b: &[u8]) -> Option<Purge> {
    if b.len() < 2 || b.len() > MAX_PURGE_MESSAGE || b[1] > 1 {
        return None;
    }
    let arg = b[2..].to_vec();
    let target = match b[0] {
        b'u' => PurgeTarget::Url(arg),
        b'p' => PurgeTarget::Prefix(arg),
        b't' => PurgeTarget::Tag(arg),
        b'a' if arg.is_empty() => PurgeTarget::All,
        _ => return None,
    };
    Some(Purge {
        target,
        soft: b[1] == 1,
    })
}

/// Log entries a listener reads per round trip.
const PURGE_LOG_READ: usize = 32;
/// Most bytes of one reply a listener reads: a round of log entries ([`PURGE_LOG_READ`] and
/// one), each a purge message of at most [`MAX_PURGE_MESSAGE`] with its ID and framing.
const MAX_LOG_REPLY: usize = (PURGE_LOG_READ + 1) * (MAX_PURGE_MESSAGE + 256) + 4096;
/// How long a listener's `XREAD` waits for a new entry before it reads the log again.
const LOG_WAIT_MS: u64 = 2000;
/// How far before its start a host reads the log the first time (another host's purge made
/// just before, by a clock a little ahead of Redis's: applied to stores that hold nothing
/// older, it costs nothing).
const LOG_START_MARGIN_MS: u64 = 5000;
/// Least time between two lines saying the purge log cannot be read.
const LOG_UNREADABLE_EVERY: Duration = Duration::from_secs(60);
/// Least connect, write and reply timeout of the listener's connection (the configured
/// `timeout` when longer): the log is followed off the request path, and the request path's
/// `timeout` (20 ms by default) is too short for a loaded host or a Redis farther away; a
/// listener that cannot connect within it never followed the log. Two seconds: a connect
/// whose first SYN is lost (a full accept queue, a dropped packet) is answered after the
/// kernel sends it again, 1 s later (the initial retransmission timeout, RFC 6298 §2.1).
const LISTENER_TIMEOUT_MIN: Duration = Duration::from_secs(2);

/// The listener's connect, write and reply timeout ([`LISTENER_TIMEOUT_MIN`]).
fn listener_timeout(cfg: &crate::cache::config::CacheRedisConfig) -> Duration {
    cfg.timeout.0.max(LISTENER_TIMEOUT_MIN)
}
/// Rounds in a row in which `XREAD` said the log had new entries and reading it found none:
/// past it the connection is dropped (a server that keeps saying so cannot make the listener
/// spin), and opened again after `retry_interval`.
const MAX_LOG_STALLS: u32 = 3;

/// Publishes a purge: appends it to the purge log (KEYS[1], a stream; the entry's ID is
/// Redis's time), keeps the log at most ARGV[2] long, records in KEYS[2] the ID of the newest
/// entry trimmed away, and publishes it on the channel KEYS[3] (which hosts of earlier
/// versions listen on). ARGV[1]: the purge message ([`encode_purge`]). One script, so that
/// the entry and its trimming go together.
const PURGE_LOG_LUA: &str = "redis.replicate_commands() local id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[1]) local n = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2]) if n > 0 then local old = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', n) redis.call('SET', KEYS[2], old[#old][1]) redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[2]) end redis.call('PUBLISH', KEYS[3], ARGV[1]) return id";

/// Reads the purge log from an entry on (KEYS[1] the log, KEYS[2] the newest ID trimmed
/// away; ARGV[1] the ID read from, included; ARGV[2] how many): the ID trimmed (or nil), the
/// entries, and the log's newest ID (or nil). One script, so that what was trimmed and what
/// is left are read at one moment.
const PURGE_LOG_READ_LUA: &str = "local t = redis.call('GET', KEYS[2]) local e = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2]) local l = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1) local last = false if l[1] then last = l[1][1] end return {t or false, e, last}";

/// A purge log entry's ID: Redis's time in milliseconds, and a sequence within it.
pub type LogId = (u64, u64);

fn parse_log_id(b: &[u8]) -> Option<LogId> {
    let s = std::str::from_utf8(b).ok()?;
    let (ms, seq) = s.split_once('-')?;
    let num = |x: &str| {
        (!x.is_empty() && x.len() <= 20 && x.bytes().all(|c| c.is_ascii_digit()))
            .then(|| x.parse::<u64>().ok())
            .flatten()
    };
    Some((num(ms)?, num(seq)?))
}

/// Where a host's listener is in the purge log. A host applies every purge of the log made
/// after it started (less [`LOG_START_MARGIN_MS`]), whether or not its connection to Redis
/// was up when the purge was made: before, the purges were only published on the channel,
/// and a host whose subscription was down at that moment missed them for good.
///
/// The gap: when entries the host has not read were trimmed away (more than
/// `purge_log_length` purges since it last read the log), or the entry it read last is no
/// longer there though nothing was trimmed past it (Redis lost its data, or the log was
/// deleted), the host cannot know what it missed, and takes the safe side: a hard purge of
/// everything in its workers' stores (counted in [`SharedLayer::purge_log_gaps`]); it then
/// reads on from there.
struct LogCursor {
    /// The last entry read (or, before any, the host's start less the margin).
    at: LogId,
    /// Whether `at` is an entry read (it must then still be in the log, or trimmed).
    seen: bool,
    /// When the host started, until the log is first read: the start is then put in Redis's
    /// time (its `TIME` less the time since), so that a host whose clock is ahead of Redis's
    /// does not skip the purges made just after it started.
    started: Option<Instant>,
}

/// What one read of the purge log found ([`PURGE_LOG_READ_LUA`]).
struct LogRead {
    trimmed: Option<LogId>,
    entries: Vec<(LogId, Bytes)>,
    /// The log's newest entry (`None`: the log is empty).
    last: Option<LogId>,
}

/// Parses the reply to [`PURGE_LOG_READ_LUA`]; `None` when it is not one (a hostile or broken
/// server: the connection is dropped). At most [`PURGE_LOG_READ`] and one entries are taken.
fn parse_log_read(f: BytesFrame) -> Option<LogRead> {
    let BytesFrame::Array(v) = f else { return None };
    let [t, e, l] = <[BytesFrame; 3]>::try_from(v).ok()?;
    let id = |f: BytesFrame| match f {
        BytesFrame::Null => Some(None),
        BytesFrame::BulkString(b) => parse_log_id(&b).map(Some),
        _ => None,
    };
    let (trimmed, last) = (id(t)?, id(l)?);
    let BytesFrame::Array(items) = e else {
        return None;
    };
    if items.len() > PURGE_LOG_READ + 1 {
        return None;
    }
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let BytesFrame::Array(pair) = item else {
            return None;
        };
        let [id, fields] = <[BytesFrame; 2]>::try_from(pair).ok()?;
        let (BytesFrame::BulkString(id), BytesFrame::Array(fields)) = (id, fields) else {
            return None;
        };
        // The message under `p`; an entry without it (not this layer's) is skipped.
        let msg = match <[BytesFrame; 2]>::try_from(fields) {
            Ok([BytesFrame::BulkString(k), BytesFrame::BulkString(m)]) if &k[..] == b"p" => m,
            _ => Bytes::new(),
        };
        entries.push((parse_log_id(&id)?, msg));
    }
    // A stream's entries come in order: out of order is not a stream.
    if entries.windows(2).any(|w| w[0].0 >= w[1].0) {
        return None;
    }
    // The newest entry is not older than any entry read.
    if entries.last().is_some_and(|(i, _)| last < Some(*i)) {
        return None;
    }
    Some(LogRead {
        trimmed,
        entries,
        last,
    })
}

impl LogCursor {
    /// A cursor for a host that starts now.
    fn at_start() -> LogCursor {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        LogCursor {
            at: (ms.saturating_sub(LOG_START_MARGIN_MS), 0),
            seen: false,
            started: Some(Instant::now()),
        }
    }

    /// Puts the host's start in Redis's time, from Redis's answer to `TIME` (seconds and
    /// microseconds) on the listener's connection; false when it is not one.
    ///
    /// On a later connection, a cursor that has read no entry (a host that has heard no
    /// purge yet, or one that found a gap) is kept at or before Redis's time less the margin:
    /// IDs are Redis's clock, and a Redis that took the place of the one the start was read
    /// from (a failover, a restart on another server, without the log) may keep a clock
    /// behind it; its purges, stamped behind the cursor, were skipped until its clock caught
    /// up. A cursor on an entry read is left: the log then still holds that entry, or the
    /// next read finds the gap.
    fn start_at_redis_time(&mut self, f: BytesFrame) -> bool {
        let BytesFrame::Array(v) = f else {
            return false;
        };
        let num = |f: &BytesFrame| match f {
            BytesFrame::BulkString(b) if !b.is_empty() && b.len() <= 20 => {
                std::str::from_utf8(b).ok()?.parse::<u64>().ok()
            }
            _ => None,
        };
        let (Some(secs), Some(us)) = (v.first().and_then(num), v.get(1).and_then(num)) else {
            return false;
        };
        let now_ms = secs.saturating_mul(1000).saturating_add(us / 1000);
        match self.started {
            Some(t0) => {
                let since = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.at = (
                    now_ms
                        .saturating_sub(since)
                        .saturating_sub(LOG_START_MARGIN_MS),
                    0,
                );
            }
            None if !self.seen => {
                self.at = self.at.min((now_ms.saturating_sub(LOG_START_MARGIN_MS), 0));
            }
            None => {}
        }
        true
    }

    /// Whether the log lost entries this host has not read (see [`LogCursor`]); the cursor
    /// then moves past what was trimmed, and forgets the entry it had read.
    ///
    /// When the log holds nothing from the cursor on (its newest entry, or the newest
    /// trimmed, is before it, or there is none), its IDs went back: Redis lost the log and
    /// its clock is behind the IDs this host read (a Redis whose clock was ahead, restarted
    /// without its data on one that is right; a failover to a server whose clock is
    /// behind). The cursor then moves back to the newest ID the log knows (the start of
    /// the IDs when it knows none), so that the purges logged from now on are read: the
    /// purge of everything the host applies for the gap covers every entry up to now.
    /// Before, it stayed where it was, and every purge logged after was skipped until
    /// Redis's clock passed it (an hour for a clock an hour ahead).
    fn gap(&mut self, r: &LogRead) -> bool {
        let gap = match r.trimmed {
            Some(t) if t >= self.at => t > self.at,
            _ => self.seen && r.entries.first().is_none_or(|(id, _)| *id != self.at),
        };
        if gap {
            let newest = r.last.max(r.trimmed);
            self.at = match newest {
                Some(n) if n < self.at => n,
                None => (0, 0),
                Some(_) => self.at.max(r.trimmed.unwrap_or((0, 0))),
            };
            self.seen = false;
        }
        gap
    }

    /// The entries after the cursor, with their IDs, which it moves past.
    fn take(&mut self, r: LogRead) -> Vec<(LogId, Bytes)> {
        let mut out = Vec::with_capacity(r.entries.len());
        for (id, msg) in r.entries {
            if id > self.at {
                self.at = id;
                self.seen = true;
                out.push((id, msg));
            }
        }
        out
    }
}

/// Applies a purge heard from the log to every worker of this host. A worker whose mailbox
/// is full (`control::MAX_PENDING_JOBS`: the log read back after an outage can hold a
/// thousand purges) is waited for, not skipped: before, such a purge was dropped for that
/// worker. Returns false once `stop` is set.
///
/// With `again` (a ticket and this host's layer) the workers await it in Redis under that
/// ticket, and the last of them to apply it has the Redis copies deleted again
/// ([`SharedLayer::delete_heard`]): every worker's writes of copies from before it are then
/// queued on the link before that deletion. The listener does not wait for it.
///
/// `at`: where the purge stands in the log; each worker moves its place there
/// (`WorkerCache::heard_in_log`), and remembers a purge by prefix or of everything, whose
/// copies are not deleted again, for the entries it finds in Redis.
fn apply_purge(
    control: &Arc<crate::control::Control>,
    p: &Purge,
    at: LogPlace,
    again: Option<(u64, Arc<SharedLayer>)>,
    stop: &std::sync::atomic::AtomicBool,
) -> bool {
    let left = Arc::new(AtomicU64::new(control.workers() as u64));
    let last = move |left: &AtomicU64, p: &Purge, again: &Option<(u64, Arc<SharedLayer>)>, c| {
        if let Some((t, l)) = again {
            if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                let done = l.settlement(c, *t);
                l.delete_heard(p, Some(*t), Some(done));
            }
        }
    };
    for i in 0..control.workers() {
        loop {
            let (q, n, a, c) = (p.clone(), left.clone(), again.clone(), control.clone());
            let posted = control.post(
                i,
                Box::new(move |w| {
                    let (p, left, again) = (q, n, a);
                    match &p {
                        // Another host's invalidation, or an exact purge there: no read of
                        // the whole store.
                        Purge {
                            target: PurgeTarget::Url(u),
                            soft: false,
                        } => w.cache.invalidate_local(u),
                        _ => {
                            w.cache.purge_local(&p);
                        }
                    }
                    w.cache.heard_in_log(at, Some(&p));
                    w.cache.note_redis_pending(again.as_ref().map(|a| a.0), &p);
                    last(&left, &p, &again, c);
                }),
            );
            match posted {
                Err(crate::control::ControlError::Full(_)) => {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    // No such worker: nothing of it to wait for.
                    last(&left, p, &again, control.clone());
                    break;
                }
                Ok(()) => break,
            }
        }
    }
    true
}

/// Where a purge the listener applies stands in the purge log, or where a host's place in it
/// starts (`WorkerCache::heard_in_log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogPlace {
    /// A purge read from the log, with its ID.
    Entry(LogId),
    /// The host's start, in Redis's time less the margin ([`LogCursor::start_at_redis_time`]).
    Start(LogId),
    /// The host found a gap ([`LogCursor::gap`]): the log's place the cursor moved to.
    Gap(LogId),
}

/// Posts every worker the place `place` (a full mailbox waited for); false once `stop` is
/// set.
fn post_to_workers(
    control: &crate::control::Control,
    stop: &std::sync::atomic::AtomicBool,
    place: LogPlace,
) -> bool {
    for i in 0..control.workers() {
        let post = || control.post(i, Box::new(move |w| w.cache.heard_in_log(place, None)));
        while let Err(crate::control::ControlError::Full(_)) = post() {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    true
}

/// Starts the thread that follows the purge log and applies each purge to this host's
/// workers ([`LogCursor`]); it ends once `stop` is set. An unreachable Redis is tried again
/// every `retry_interval`; the purges made meanwhile are read once it answers.
pub fn spawn_purge_listener(
    cfg: &crate::cache::config::CacheRedisConfig,
    control: Arc<crate::control::Control>,
    layer: Arc<SharedLayer>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("ringway-purge".into())
        .spawn(move || {
            let mut cursor = LogCursor::at_start();
            let mut logged: Option<Instant> = None;
            let mut unlogged = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Redis unreachable is the link's to log; a log that cannot be read (an error
                // answered, such as `WRONGTYPE` or a Redis without streams, or a reply that is
                // not one, such as bytes that are no RESP reply) is counted and logged here,
                // at most once a minute: the purges made meanwhile are read once it can be.
                if let Err(e) = listen(&cfg, &control, &layer, &mut cursor, &stop) {
                    let unreadable = matches!(
                        e.kind(),
                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::Other
                    );
                    if unreadable {
                        layer.purge_log_errors.fetch_add(1, Ordering::Relaxed);
                        if logged.is_none_or(|t| t.elapsed() >= LOG_UNREADABLE_EVERY) {
                            logged = Some(Instant::now());
                            let again = match std::mem::take(&mut unlogged) {
                                0 => String::new(),
                                n => format!(" ({n} more times since the last such line)"),
                            };
                            layer.purge_log_lines.fetch_add(1, Ordering::Relaxed);
                            crate::warn!(
                                "the purge log in redis at {} cannot be read ({e}){again}; purges from other hosts reach this one once it can",
                                cfg.address.text
                            );
                        } else {
                            unlogged += 1;
                        }
                    }
                }
                let until = Instant::now() + cfg.retry_interval.0;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    layer.settle_again(&control);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
}

/// One connection to Redis that follows the purge log, until it fails or `stop` is set:
/// reads what the log holds after the cursor, then waits (`XREAD BLOCK`) for more.
fn listen(
    cfg: &crate::cache::config::CacheRedisConfig,
    control: &Arc<crate::control::Control>,
    layer: &Arc<SharedLayer>,
    cursor: &mut LogCursor,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    // Not the request path's `timeout` (issue: before, a listener that could not connect
    // within its 20 ms never followed the log); see [`LISTENER_TIMEOUT_MIN`].
    let late = listener_timeout(cfg);
    let mut sock = std::net::TcpStream::connect_timeout(&cfg.address.addr, late)?;
    // Short reads, so that the stop flag is seen.
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    sock.set_write_timeout(Some(late))?;
    // A reply is late past `late`, plus the wait it asked for.
    let log = format!("{}purge-log", cfg.key_prefix);
    let trimmed = format!("{}purge-log-trimmed", cfg.key_prefix);
    let mut rbuf = bytes::BytesMut::new();
    let mut chunk = [0u8; 4096];
    let mut call = |args: &[&[u8]], wait: Duration| -> std::io::Result<Option<BytesFrame>> {
        let mut cmd = Vec::new();
        cmd.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a);
            cmd.extend_from_slice(b"\r\n");
        }
        sock.write_all(&cmd)?;
        let deadline = Instant::now() + wait + late;
        loop {
            // Checked for depth, size and frame count before it is decoded (`crate::redis`).
            if let Some(f) = crate::redis::decode_reply_within(&mut rbuf, MAX_PURGE_MESSAGE)? {
                if let BytesFrame::Error(e) = f {
                    return Err(std::io::Error::other(e.to_string()));
                }
                return Ok(Some(f));
            }
            if rbuf.len() > MAX_LOG_REPLY {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "purge log reply too large",
                ));
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                // Bytes that make no whole reply by then are taken for a malformed reply,
                // not for a Redis that is slow (before, they were: a reply of stray bytes
                // was neither logged nor counted).
                if !rbuf.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{} bytes that make no whole RESP reply within {} ms",
                            rbuf.len(),
                            (wait + late).as_millis()
                        ),
                    ));
                }
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            match sock.read(&mut chunk) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    };
    if let Some(p) = &cfg.password {
        if call(&[b"AUTH", p.as_bytes()], Duration::ZERO)?.is_none() {
            return Ok(());
        }
    }
    if cursor.started.is_some() || !cursor.seen {
        let first = cursor.started.is_some();
        let Some(f) = call(&[b"TIME"], Duration::ZERO)? else {
            return Ok(());
        };
        if !cursor.start_at_redis_time(f) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not an answer to TIME",
            ));
        }
        // Every purge logged before the host started is behind what its workers fetch: their
        // place in the log starts there ([`Heard`]; until now it was none).
        if first && !post_to_workers(control, stop, LogPlace::Start(cursor.at)) {
            return Ok(());
        }
    }
    let count = (PURGE_LOG_READ + 1).to_string();
    let wait = LOG_WAIT_MS.to_string();
    // `XREAD` said there was more to read.
    let mut woke = false;
    let mut stalls = 0;
    while !stop.load(Ordering::Relaxed) {
        layer.settle_again(control);
        let from = format!("{}-{}", cursor.at.0, cursor.at.1);
        let Some(f) = call(
            &[
                b"EVAL",
                PURGE_LOG_READ_LUA.as_bytes(),
                b"2",
                log.as_bytes(),
                trimmed.as_bytes(),
                from.as_bytes(),
                count.as_bytes(),
            ],
            Duration::ZERO,
        )?
        else {
            return Ok(());
        };
        let read = parse_log_read(f).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a purge log reply")
        })?;
        cursor.started = None;
        let full = read.entries.len() > PURGE_LOG_READ;
        if cursor.gap(&read) {
            layer.purge_log_gaps.fetch_add(1, Ordering::Relaxed);
            crate::warn!(
                "the purge log in redis at {} lost purges this host had not read; every stored response of this host is purged",
                cfg.address.text
            );
            let all = Purge {
                target: PurgeTarget::All,
                soft: false,
            };
            // At the log's place the cursor moved to: the purges it lost are not known.
            let at = LogPlace::Gap(cursor.at);
            if !apply_purge(control, &all, at, None, stop) {
                return Ok(());
            }
        }
        let msgs = cursor.take(read);
        if woke && msgs.is_empty() {
            stalls += 1;
            if stalls >= MAX_LOG_STALLS {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the purge log says it has entries and gives none",
                ));
            }
        } else {
            stalls = 0;
        }
        for (id, m) in &msgs {
            if let Some(p) = decode_purge(m) {
                layer.purges_heard.fetch_add(1, Ordering::Relaxed);
                let again = matches!(p.target, PurgeTarget::Url(_) | PurgeTarget::Tag(_))
                    .then(|| (layer.purge_ticket(), layer.clone()));
                if !apply_purge(control, &p, LogPlace::Entry(*id), again, stop) {
                    return Ok(());
                }
            }
        }
        if full {
            woke = true;
            continue;
        }
        let from = format!("{}-{}", cursor.at.0, cursor.at.1);
        let Some(f) = call(
            &[
                b"XREAD",
                b"COUNT",
                b"1",
                b"BLOCK",
                wait.as_bytes(),
                b"STREAMS",
                log.as_bytes(),
                from.as_bytes(),
            ],
            Duration::from_millis(LOG_WAIT_MS),
        )?
        else {
            return Ok(());
        };
        // `XREAD` answers nil (no entry within its wait) or the stream's entries; anything
        // else is not its reply.
        woke = match f {
            BytesFrame::Null => false,
            BytesFrame::Array(_) => true,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not an XREAD reply",
                ))
            }
        };
    }
    Ok(())
}

fn put_lv(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// An object as it is written to Redis, by a writer at no known place in the purge log.
pub fn encode(o: &Object) -> Vec<u8> {
    encode_heard(o, (0, 0))
}

/// An object as it is written to Redis by a worker at `heard` in the purge log ([`Heard`]).
/// A copy a soft purge marked stale says so (RFC 9111 §4.4: another host takes it stale).
pub fn encode_heard(o: &Object, heard: Heard) -> Vec<u8> {
    let mut out = Vec::with_capacity(o.weight() as usize + 80);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&o.status.to_be_bytes());
    out.push(
        u8::from(o.t.no_stale)
            | (u8::from(o.t.always_validate) << 1)
            | (u8::from(o.invalid.get()) << 2),
    );
    out.extend_from_slice(&heard.0.to_be_bytes());
    out.extend_from_slice(&heard.1.to_be_bytes());
    for v in [
        o.t.response_time,
        o.t.initial_age,
        o.t.lifetime,
        o.t.swr,
        o.t.sie,
    ] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    put_lv(&mut out, &o.reason);
    out.extend_from_slice(&(o.fields.len() as u32).to_be_bytes());
    for (n, v) in &o.fields {
        put_lv(&mut out, n);
        put_lv(&mut out, v);
    }
    put_lv(&mut out, &o.url);
    out.extend_from_slice(&(o.tags.len() as u32).to_be_bytes());
    for t in &o.tags {
        put_lv(&mut out, t);
    }
    out.extend_from_slice(&(o.vary.len() as u32).to_be_bytes());
    for (n, v) in &o.vary {
        put_lv(&mut out, n);
        put_lv(&mut out, v);
    }
    put_lv(&mut out, &o.body);
    out
}

/// A cursor over an entry read back from Redis: every length is checked against what is left.
struct Reader<'a> {
    b: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<usize> {
        let s = self.take(4)?;
        Some(u32::from_be_bytes(s.try_into().ok()?) as usize)
    }
    fn u64(&mut self) -> Option<u64> {
        let s = self.take(8)?;
        Some(u64::from_be_bytes(s.try_into().ok()?))
    }
    /// Where the next length-prefixed item lies in the entry.
    fn range(&mut self) -> Option<std::ops::Range<usize>> {
        let n = self.u32()?;
        let start = self.at;
        self.take(n)?;
        Some(start..start + n)
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()?;
        let start = self.at;
        self.take(n)?;
        Some(self.b.slice(start..start + n))
    }
    /// A count of items that take at least `min` bytes each: at most [`MAX_ENTRY_FIELDS`],
    /// and no more than the bytes left can hold (so that no room is reserved for items the
    /// entry does not have).
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()?;
        let left = self.b.len().saturating_sub(self.at);
        (n <= MAX_ENTRY_FIELDS && n.saturating_mul(min) <= left).then_some(n)
    }
}

/// An entry read back from Redis; `None` when it is not one this version (or the one before,
/// RWC2) wrote whole.
pub fn decode(b: &Bytes) -> Option<Object> {
    decode_heard(b).map(|(o, _)| o)
}

/// [`decode`], with the place in the purge log its writer had reached ([`Heard`]; `(0, 0)`
/// for an RWC2 entry, which does not say).
pub fn decode_heard(b: &Bytes) -> Option<(Object, Heard)> {
    let mut r = Reader { b, at: 0 };
    let rwc3 = match r.take(4)? {
        m if m == MAGIC => true,
        m if m == MAGIC_RWC2 => false,
        _ => return None,
    };
    let st = r.take(2)?;
    let status = u16::from_be_bytes([st[0], st[1]]);
    // The statuses `serve::screen` lets the cache store: never 206 or 304.
    if !(200..600).contains(&status) || status == 206 || status == 304 {
        return None;
    }
    let flags = r.take(1)?[0];
    // Only the flags the version writes: two in RWC2, three in RWC3.
    if flags > if rwc3 { 7 } else { 3 } {
        return None;
    }
    let heard = if rwc3 { (r.u64()?, r.u64()?) } else { (0, 0) };
    let t = Timing {
        response_time: r.u64()?,
        initial_age: r.u64()?,
        lifetime: r.u64()?,
        swr: r.u64()?,
        sie: r.u64()?,
        no_stale: flags & 1 != 0,
        always_validate: flags & 2 != 0,
    };
    let reason = r.bytes()?;
    let n = r.count(8)?;
    // The fields' block is the part of the entry that holds them (with their lengths between
    // them, which its weight counts): no copy; spans are offsets from its start.
    let start = r.at;
    let mut spans = Vec::with_capacity(n);
    for _ in 0..n {
        let (name_at, value_at) = (r.range()?, r.range()?);
        let (name, value) = (b.get(name_at.clone())?, b.get(value_at.clone())?);
        // Nothing that could break a head: names are tokens, values only field-value bytes
        // (RFC 9110 §5.5: no CR, LF, NUL or other control but HTAB, which the parser of
        // upstream responses never lets through either), and no framing or hop-by-hop field
        // (never stored, RFC 9111 §3.1: the answer's own Content-Length would meet the
        // entry's), nor one spelled with `_` for `-`, which the parser of upstream responses
        // leaves out (RFC 9112 §11.2; an entry written before it did is not served).
        if name.is_empty()
            || !name.iter().all(|c| crate::http::is_tchar(*c))
            || !value.iter().all(|c| crate::http::is_field_value_byte(*c))
            || super::policy::unstorable_field(name)
            || crate::http::is_framing_name_with_underscore(name)
        {
            return None;
        }
        // Offsets past `u32` (an entry over 4 GiB) are refused.
        spans.push(HeaderSpan {
            name: span(name_at.start.checked_sub(start)?, name.len())?,
            value: span(value_at.start.checked_sub(start)?, value.len())?,
        });
    }
    let fields = Fields::from_block(b.slice(start..r.at), spans);
    // RFC 9112 §4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ).
    if !reason.iter().all(|c| crate::http::is_field_value_byte(*c)) {
        return None;
    }
    let url = r.bytes()?;
    let n = r.count(4)?;
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        tags.push(r.bytes()?.to_vec().into_boxed_slice());
    }
    let n = r.count(8)?;
    let mut vary = Vec::with_capacity(n);
    for _ in 0..n {
        let name: Box<[u8]> = r.bytes()?.to_vec().into();
        vary.push((name, r.bytes()?.to_vec()));
    }
    let body = r.bytes()?;
    if r.at != b.len() {
        return None;
    }
    let o = Object {
        status,
        reason,
        fields,
        body,
        t,
        url,
        tags,
        vary,
        invalid: std::cell::Cell::new(flags & 4 != 0),
        born: std::cell::Cell::new(0),
    };
    Some((o, heard))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose cache uses the Redis (a fake one, in these tests) at `addr`.
    fn config_with_redis_at(addr: impl std::fmt::Display) -> crate::config::Config {
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"{addr}\"\n");
        crate::config::Config::parse(&src, "t.toml").expect("config")
    }
    use crate::cache::policy;
    use crate::http::request::RequestHead;

    #[test]
    fn variant_ids_are_those_a_lookup_builds_and_never_shared_by_two_variants() {
        use crate::http::request::{parse_request, Limits};
        let raw = b"GET /p HTTP/1.1\r\nHost: h\r\nAccept-Encoding: br, gzip\r\n\r\n";
        let mut head = RequestHead::default();
        parse_request(raw, &Limits::default(), &mut head)
            .expect("valid head")
            .expect("complete head");
        head.raw = Bytes::from_static(raw);
        let name: Box<[u8]> = b"accept-encoding"[..].into();
        let stored = policy::vary_value(&name, &mut head.header_values(&name));
        let put = variant_id(b"k", [(&name[..], &stored[..])].into_iter());
        let v = policy::vary_value(&name, &mut head.header_values(&name));
        let get = variant_id(b"k", [(&name[..], &v[..])].into_iter());
        assert_eq!(put, get);
        // A key that ends where a field name begins, and a value that swallows a name, differ.
        let ids = [
            variant_id(b"ka", [(&b"b"[..], &b""[..])].into_iter()),
            variant_id(b"k", [(&b"ab"[..], &b""[..])].into_iter()),
            variant_id(b"k", [(&b"a"[..], &b"b"[..])].into_iter()),
            variant_id(
                b"k",
                [(&b"a"[..], &b""[..]), (&b"b"[..], &b""[..])].into_iter(),
            ),
            variant_id(b"k", std::iter::empty()),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    /// A purge whose Redis side failed is kept to be sent again, at most
    /// [`MAX_UNSENT_PURGES`]: one equal to a kept purge, with a later ticket, replaces it
    /// (the earlier is done with it) and takes no other place; past the bound every kept purge and
    /// the new one are folded into one hard purge of everything (issue 12: before, the
    /// oldest was given up, its copies left in Redis), each folded one done and counted.
    #[test]
    fn purges_kept_to_be_sent_again_are_bounded_and_folded_into_a_purge_of_everything() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"127.0.0.1:9\"\n";
        let cfg = crate::config::Config::parse(src, "t.toml").expect("config");
        let l = SharedLayer::new(&cfg).expect("a layer");
        let done = Arc::new(AtomicU64::new(0));
        let url = |i: usize| Purge {
            target: PurgeTarget::Url(format!("h/{i}").into_bytes()),
            soft: false,
        };
        let keep = |p: Purge, ticket: u64| {
            let d = done.clone();
            l.keep_unsent(Unsent {
                purge: p,
                ticket: Some(ticket),
                done: Some(Box::new(move |_| {
                    d.fetch_add(1, Ordering::Relaxed);
                })),
            });
        };
        for i in 0..MAX_UNSENT_PURGES {
            keep(url(i), i as u64);
        }
        assert_eq!(l.unsent_purges(), MAX_UNSENT_PURGES);
        // One equal to a kept purge, with a later ticket, replaces it (the earlier is done
        // with it, below); one with an earlier ticket would take a place of its own.
        keep(url(5), 1000);
        assert_eq!(done.load(Ordering::Relaxed), 0);
        assert_eq!(l.unsent_purges(), MAX_UNSENT_PURGES);
        assert_eq!(l.purges_given_up.load(Ordering::Relaxed), 0);
        // Past the bound: one purge of everything in their place, every one of them done.
        keep(url(5), 3);
        assert_eq!(l.unsent_purges(), 1);
        assert_eq!(
            done.load(Ordering::Relaxed),
            1 + MAX_UNSENT_PURGES as u64 + 1
        );
        assert_eq!(
            l.purges_given_up.load(Ordering::Relaxed),
            MAX_UNSENT_PURGES as u64 + 1
        );
        assert_eq!(
            l.purges_failed.load(Ordering::Relaxed),
            MAX_UNSENT_PURGES as u64 + 2
        );
        let kept = l.unsent.lock().expect("lock");
        assert_eq!(
            kept.front().map(|k| &k.purge),
            Some(&Purge {
                target: PurgeTarget::All,
                soft: false,
            })
        );
    }

    /// RFC 9111 §4.4: a kept purge replaced by an equal later one stays open until the later
    /// one is settled: its ticket keeps `settled_below` at or under it and its `done` is not
    /// called. Before, it was settled at once, and a worker that never noted the later purge
    /// (its control mailbox full) stopped awaiting a purge whose Redis side was not done.
    #[test]
    fn rfc9111_4_4_a_replaced_kept_purge_is_settled_with_the_one_that_replaced_it() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"127.0.0.1:9\"\n";
        let cfg = crate::config::Config::parse(src, "t.toml").expect("config");
        let l = SharedLayer::new(&cfg).expect("a layer");
        let order = Arc::new(Mutex::new(Vec::new()));
        let p = Purge {
            target: PurgeTarget::Url(b"h/x".to_vec()),
            soft: false,
        };
        let (first, second) = (l.purge_ticket(), l.purge_ticket());
        for t in [first, second] {
            let o = order.clone();
            l.keep_unsent(Unsent {
                purge: p.clone(),
                ticket: Some(t),
                done: Some(Box::new(move |_| o.lock().expect("lock").push(t))),
            });
        }
        assert_eq!(l.unsent_purges(), 1);
        assert!(order.lock().expect("lock").is_empty(), "none settled yet");
        assert_eq!(l.settled_below(), first);
        // The later one goes through (as `PurgeRun::finish` settles it): both are settled,
        // the earlier first, and every ticket is closed.
        let k = l.unsent.lock().expect("lock").pop_front().expect("kept");
        l.settle(k.ticket, k.done, None);
        assert_eq!(*order.lock().expect("lock"), vec![first, second]);
        assert_eq!(l.settled_below(), second + 1);
    }

    /// Kept purges that failed with the link up are tried again on one timer (issue 12):
    /// asked for once however many fail, 1 s after the first failure, twice as late at each
    /// try, at most 30 s; back to 1 s once a purge goes through with none kept. A link that is
    /// down asks for none (its `on_up` sends them).
    #[test]
    fn kept_purges_are_tried_again_on_one_timer_with_backoff() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"127.0.0.1:9\"\n";
        let cfg = crate::config::Config::parse(src, "t.toml").expect("config");
        let l = SharedLayer::new(&cfg).expect("a layer");
        let link = l.link().clone();
        for secs in [1, 2, 4, 8, 16, 30, 30] {
            let before = Instant::now();
            l.retry_later();
            l.retry_later();
            let at = link.take_on_up_at_for_tests().expect("a try asked for");
            let wait = at.duration_since(before);
            assert!(
                wait >= Duration::from_secs(secs) && wait < Duration::from_secs(secs + 1),
                "{wait:?} for {secs} s"
            );
            assert!(link.take_on_up_at_for_tests().is_none(), "one timer");
        }
        l.went_through();
        l.retry_later();
        let at = link.take_on_up_at_for_tests().expect("asked");
        assert!(at.duration_since(Instant::now()) <= Duration::from_secs(1));
        link.set_down_for_tests();
        l.retry_later();
        assert!(link.take_on_up_at_for_tests().is_none());
    }

    /// `[cache.redis] purge_retry_first` and `purge_retry_max` (before, constants: 1 s and
    /// 30 s) set the kept purges' timer: here 200 ms, then twice as late, at most 500 ms.
    #[test]
    fn the_kept_purges_timer_follows_purge_retry_first_and_max() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"127.0.0.1:9\"\npurge_retry_first = \"200ms\"\npurge_retry_max = \"500ms\"\n";
        let cfg = crate::config::Config::parse(src, "t.toml").expect("config");
        let l = SharedLayer::new(&cfg).expect("a layer");
        let link = l.link().clone();
        for ms in [200, 400, 500, 500] {
            let before = Instant::now();
            l.retry_later();
            let wait = link
                .take_on_up_at_for_tests()
                .expect("a try asked for")
                .duration_since(before);
            assert!(
                wait >= Duration::from_millis(ms) && wait < Duration::from_millis(ms + 100),
                "{wait:?} for {ms} ms"
            );
        }
        l.went_through();
        l.retry_later();
        let at = link.take_on_up_at_for_tests().expect("asked");
        assert!(at.duration_since(Instant::now()) <= Duration::from_millis(200));
    }

    /// `purge_retry_first` over 30 s given alone (its documented range is 10 ms to 1 h) is
    /// taken, and the wait stays there: `purge_retry_max`, not given, is the longer of 30 s
    /// and `purge_retry_first`. Before, the config was refused at load (`purge_retry_max`, a
    /// key the file did not hold, "must be at least purge_retry_first"). Given, it is kept.
    #[test]
    fn purge_retry_max_not_given_is_at_least_purge_retry_first() {
        let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"127.0.0.1:9\"\n";
        let cfg =
            crate::config::Config::parse(&format!("{base}purge_retry_first = \"45s\"\n"), "t.toml")
                .expect("purge_retry_first alone, over 30 s, is taken");
        let l = SharedLayer::new(&cfg).expect("a layer");
        let link = l.link().clone();
        let first = Duration::from_secs(45);
        for _ in 0..3 {
            let before = Instant::now();
            l.retry_later();
            let after = Instant::now();
            let at = link.take_on_up_at_for_tests().expect("a try asked for");
            assert!(
                at >= before + first && at <= after + first,
                "{:?}",
                at - before
            );
        }
        let r = |extra: &str| {
            crate::config::Config::parse(&format!("{base}{extra}"), "t.toml")
                .map(|c| c.cache.redis.expect("redis").purge_retry_max())
        };
        assert_eq!(r("").expect("defaults"), Duration::from_secs(30));
        assert_eq!(
            r("purge_retry_first = \"2s\"\n").expect("first alone"),
            Duration::from_secs(30)
        );
        assert_eq!(
            r("purge_retry_first = \"2s\"\npurge_retry_max = \"5s\"\n").expect("both"),
            Duration::from_secs(5)
        );
        let err = r("purge_retry_first = \"2m\"\npurge_retry_max = \"1m\"\n")
            .expect_err("given, below purge_retry_first");
        assert!(
            err.to_string().contains("cache.redis.purge_retry_max"),
            "{err}"
        );
    }

    /// A purge whose Redis side failed while the link was down, kept only once the link had
    /// come up again (its deletion refused on a worker as the link came up, its publication
    /// answered after), is still sent again: the link's `on_up` had already taken the kept
    /// purges, and before, this one stayed kept, awaited on every worker and unheard by the
    /// other hosts, until the next purge or the next time the link went down and up (RFC 9111
    /// §4.4: what a purge removed must not come back). Over a socket to a stand-in Redis.
    #[test]
    fn rfc9111_4_4_a_purge_kept_after_the_link_came_up_is_still_sent_again() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (heard_tx, heard) = std::sync::mpsc::channel::<Vec<u8>>();
        // Answers each command `:1`, and tells the test every command's name.
        let server = std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let (mut buf, mut chunk) = (bytes::BytesMut::new(), [0u8; 4096]);
            loop {
                while let Ok(Some(f)) = crate::redis::decode_reply(&mut buf) {
                    if let BytesFrame::Array(a) = f {
                        if let Some(BytesFrame::BulkString(name)) = a.first() {
                            let _ = heard_tx.send(name.to_vec());
                        }
                    }
                    if s.write_all(b":1\r\n").is_err() {
                        return;
                    }
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let cfg = config_with_redis_at(addr);
        let l = SharedLayer::new(&cfg).expect("a layer");
        let link = l.link().clone();
        link.set_down_for_tests();
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let run = PurgeRun {
            layer: l.clone(),
            purge: Purge {
                target: PurgeTarget::Url(b"h/p".to_vec()),
                soft: false,
            },
            ticket: Some(1),
            ups: link.ups(),
            failed: AtomicBool::new(false),
            done: Mutex::new(Some(Box::new(move |_| {
                let _ = done_tx.send(());
            }))),
            log: true,
        };
        // Its deletion refused while the link was down; the link comes up (its `on_up` finds
        // nothing kept); its publication answered.
        run.note(&None);
        link.set_up_for_tests();
        run.finish(Some(BytesFrame::Integer(1)));
        assert_eq!(l.unsent_purges(), 1);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = crate::redis::spawn(link.clone(), stop.clone()).expect("thread");
        let sent = done.recv_timeout(Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        let _ = thread.join();
        drop(link);
        drop(l);
        // Unblocks the stand-in's accept when the link never connected.
        drop(std::net::TcpStream::connect(addr));
        let _ = server.join();
        assert!(sent.is_ok(), "the kept purge was not sent again");
        let names: Vec<Vec<u8>> = heard.try_iter().collect();
        assert_eq!(names, [b"EVAL".to_vec(), b"EVAL".to_vec()]);
    }

    /// The purge log's replies are parsed strictly (issue 12: a hostile Redis must not panic
    /// the listener nor grow its memory): anything but the script's three parts, more entries
    /// than asked for, an ID that is not two decimal numbers, or entries out of order is
    /// refused (the connection dropped).
    #[test]
    fn purge_log_replies_are_parsed_strictly() {
        let b = |s: &str| BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()));
        let entry = |id: &str, msg: &str| {
            BytesFrame::Array(vec![b(id), BytesFrame::Array(vec![b("p"), b(msg)])])
        };
        let reply_to = |t: BytesFrame, e: Vec<BytesFrame>, last: BytesFrame| {
            BytesFrame::Array(vec![t, BytesFrame::Array(e), last])
        };
        let reply = |t: BytesFrame, e: Vec<BytesFrame>| reply_to(t, e, b("9999-0"));
        let ok = parse_log_read(reply(
            b("5-1"),
            vec![entry("6-0", "u\0h/p"), entry("6-1", "x")],
        ))
        .expect("a reply");
        assert_eq!(ok.trimmed, Some((5, 1)));
        assert_eq!(ok.entries.len(), 2);
        assert_eq!(ok.entries[0].0, (6, 0));
        assert_eq!(ok.last, Some((9999, 0)));
        let empty = parse_log_read(reply_to(BytesFrame::Null, vec![], BytesFrame::Null));
        assert!(empty.is_some_and(|r| r.last.is_none() && r.entries.is_empty()));
        let bad = [
            BytesFrame::Null,
            BytesFrame::Array(vec![BytesFrame::Null, BytesFrame::Array(vec![])]),
            reply(b("5"), vec![]),
            reply(b("-1-0"), vec![]),
            reply(b("1-99999999999999999999999"), vec![]),
            reply(BytesFrame::Integer(5), vec![]),
            reply(BytesFrame::Null, vec![entry("7-0", "a"), entry("6-0", "b")]),
            reply(BytesFrame::Null, vec![entry("7-0", "a"), entry("7-0", "b")]),
            reply(BytesFrame::Null, vec![b("7-0")]),
            reply(BytesFrame::Null, vec![entry("x-0", "a")]),
            // The newest entry older than one read, absent with entries, not an ID.
            reply_to(BytesFrame::Null, vec![entry("7-0", "a")], b("6-0")),
            reply_to(BytesFrame::Null, vec![entry("7-0", "a")], BytesFrame::Null),
            reply_to(BytesFrame::Null, vec![], b("7")),
            reply(
                BytesFrame::Null,
                (0..PURGE_LOG_READ as u64 + 2)
                    .map(|i| entry(&format!("{i}-0"), "a"))
                    .collect(),
            ),
        ];
        for (i, f) in bad.into_iter().enumerate() {
            assert!(parse_log_read(f).is_none(), "case {i}");
        }
    }

    /// A purge whose message the listeners would not read is logged as a hard purge of
    /// everything; any other as it is.
    #[test]
    fn a_purge_too_long_for_the_log_is_logged_as_a_purge_of_everything() {
        let p = |n: usize| {
            Bytes::from(encode_purge(&Purge {
                target: PurgeTarget::Url(vec![b'u'; n]),
                soft: true,
            }))
        };
        let fits = p(MAX_PURGE_MESSAGE - 2);
        assert_eq!(log_message(fits.clone()), fits);
        let logged = log_message(p(MAX_PURGE_MESSAGE - 1));
        assert_eq!(
            decode_purge(&logged),
            Some(Purge {
                target: PurgeTarget::All,
                soft: false,
            })
        );
    }

    /// Where a gap in the purge log is found (issue 12), and only there.
    #[test]
    fn a_gap_in_the_purge_log_is_found_where_entries_the_host_had_not_read_are_gone() {
        let read = |trimmed: Option<LogId>, ids: &[LogId]| LogRead {
            trimmed,
            entries: ids.iter().map(|i| (*i, Bytes::new())).collect(),
            last: ids.last().copied().max(Some((1000, 0))),
        };
        let start = || LogCursor {
            at: (100, 0),
            seen: false,
            started: None,
        };
        // Nothing read yet: older trims are not a gap; one past the start is.
        assert!(!start().gap(&read(None, &[])));
        assert!(!start().gap(&read(Some((99, 5)), &[(101, 0)])));
        let mut c = start();
        assert!(c.gap(&read(Some((150, 0)), &[(151, 0)])));
        assert_eq!((c.at, c.seen), ((150, 0), false));
        // It reads on from there, once.
        assert_eq!(c.take(read(None, &[(150, 0), (151, 0)])).len(), 1);
        assert_eq!((c.at, c.seen), ((151, 0), true));
        // The entry read last is still there, or trimmed itself: no gap.
        assert!(!c.gap(&read(None, &[(151, 0), (152, 0)])));
        assert!(!c.gap(&read(Some((151, 0)), &[(152, 0)])));
        // It is gone though nothing past it was trimmed (Redis lost its data): a gap, once.
        assert!(c.gap(&read(None, &[(160, 0)])));
        assert!(!c.gap(&read(None, &[(160, 0)])));
        let mut c = LogCursor {
            at: (151, 0),
            seen: true,
            started: None,
        };
        assert!(c.gap(&read(None, &[])));
        // The log's IDs went back (Redis lost it, and its clock is behind the IDs read): the
        // cursor goes back to the newest ID the log knows, or to the start of the IDs when it
        // knows none, and what is logged next is read, with no other gap.
        let back = |trimmed: Option<LogId>, ids: &[LogId], last: Option<LogId>| LogRead {
            trimmed,
            entries: ids.iter().map(|i| (*i, Bytes::new())).collect(),
            last,
        };
        let ahead = || LogCursor {
            at: (5000, 0),
            seen: true,
            started: None,
        };
        let mut c = ahead();
        assert!(c.gap(&back(None, &[(10, 0)], Some((12, 0)))));
        assert_eq!((c.at, c.seen), ((12, 0), false));
        assert_eq!(
            c.take(back(None, &[(12, 0), (13, 0)], Some((13, 0)))).len(),
            1
        );
        let mut c = ahead();
        assert!(c.gap(&back(None, &[], None)));
        assert_eq!((c.at, c.seen), ((0, 0), false));
        assert!(!c.gap(&back(None, &[(20, 0)], Some((20, 0)))));
        assert_eq!(c.take(back(None, &[(20, 0)], Some((20, 0)))).len(), 1);
        let mut c = ahead();
        assert!(c.gap(&back(Some((7, 0)), &[], None)));
        assert_eq!((c.at, c.seen), ((7, 0), false));
        assert!(!c.gap(&back(Some((7, 0)), &[(8, 0)], Some((8, 0)))));
        // A host's start is put in Redis's time: 10 s after the epoch by Redis, less the time
        // since it started and the margin.
        let mut c = LogCursor {
            at: (u64::MAX, 0),
            seen: false,
            started: Some(Instant::now()),
        };
        let b = |s: &str| BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()));
        assert!(!c.start_at_redis_time(BytesFrame::Array(vec![b("x"), b("0")])));
        assert!(c.start_at_redis_time(BytesFrame::Array(vec![b("10"), b("500000")])));
        assert!(c.at.0 <= 10_500 - LOG_START_MARGIN_MS);
    }

    /// A Redis that takes the place of the one a host read its start from (a failover, a
    /// restart elsewhere, without the log), with a clock 100 s behind: before, the host's
    /// cursor stayed at its start by the first clock, and the purges the new one logged,
    /// stamped behind it, were skipped (for 100 s); now a cursor that has read no entry is
    /// put back at the new Redis's time at each connection. Over a socket, with a server
    /// that answers as Redis would.
    #[test]
    fn a_host_that_heard_no_purge_follows_a_redis_whose_clock_is_behind_the_first() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let server = std::thread::spawn(move || {
            // The first Redis (clock at 1000 s, an empty log), then the second (900 s, one
            // purge logged at 900 s).
            for (time, log) in [
                (&b"1000"[..], &b"*3\r\n$-1\r\n*0\r\n$-1\r\n"[..]),
                (
                    b"900",
                    b"*3\r\n$-1\r\n*1\r\n*2\r\n$8\r\n900000-0\r\n*2\r\n$1\r\np\r\n$5\r\nu\0h/p\r\n$8\r\n900000-0\r\n",
                ),
            ] {
                let Ok((mut s, _)) = l.accept() else { return };
                let (mut buf, mut chunk) = (bytes::BytesMut::new(), [0u8; 4096]);
                let mut evals = 0;
                'conn: loop {
                    while let Ok(Some(BytesFrame::Array(a))) = crate::redis::decode_reply(&mut buf)
                    {
                        let name = match a.first() {
                            Some(BytesFrame::BulkString(n)) => n.to_vec(),
                            _ => Vec::new(),
                        };
                        let answer: Vec<u8> = match &name[..] {
                            b"TIME" => {
                                let mut r = format!("*2\r\n${}\r\n", time.len()).into_bytes();
                                r.extend_from_slice(time);
                                r.extend_from_slice(b"\r\n$1\r\n0\r\n");
                                r
                            }
                            b"EVAL" => {
                                evals += 1;
                                log.to_vec()
                            }
                            _ => b"$-1\r\n".to_vec(),
                        };
                        // The first Redis goes away after one round; the listener is stopped
                        // after two on the second.
                        if evals == 2 && time == b"900" {
                            s2.store(true, Ordering::Relaxed);
                        }
                        if s.write_all(&answer).is_err() || (evals == 1 && time == b"1000") {
                            break 'conn;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        });
        let cfg = config_with_redis_at(addr);
        let layer = SharedLayer::new(&cfg).expect("a layer");
        let r = cfg.cache.redis.as_ref().expect("redis");
        let control = crate::control::Control::new(1);
        let mut cursor = LogCursor::at_start();
        // The first Redis: the start put in its time, then it goes away.
        assert!(listen(r, &control, &layer, &mut cursor, &stop).is_err());
        assert!(cursor.at.0 <= 1_000_000 - LOG_START_MARGIN_MS && cursor.at.0 > 990_000);
        // The second: its purge, logged behind the start, is heard.
        assert!(listen(r, &control, &layer, &mut cursor, &stop).is_ok());
        server.join().expect("server");
        assert_eq!(layer.purges_heard.load(Ordering::Relaxed), 1);
        assert_eq!((cursor.at, cursor.seen), ((900_000, 0), true));
    }

    /// A server that says, at every `XREAD`, that the log has new entries, and gives none when
    /// it is read, cannot make the listener spin: the connection is dropped after
    /// [`MAX_LOG_STALLS`] such rounds. One whose reply to a read of the log is longer than
    /// the listener reads ([`MAX_LOG_REPLY`]) is dropped too, its reply never held whole.
    #[test]
    fn a_hostile_purge_log_server_cannot_make_the_listener_spin_or_hold_much() {
        use std::io::{Read, Write};
        for hostile in ["stalls", "long"] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let server = std::thread::spawn(move || {
                let Ok((mut s, _)) = l.accept() else { return 0 };
                let (mut buf, mut chunk, mut evals) = (bytes::BytesMut::new(), [0u8; 4096], 0);
                loop {
                    while let Ok(Some(BytesFrame::Array(a))) = crate::redis::decode_reply(&mut buf)
                    {
                        let name = match a.first() {
                            Some(BytesFrame::BulkString(n)) => n.to_vec(),
                            _ => Vec::new(),
                        };
                        let answer: Vec<u8> = match (&name[..], hostile) {
                            (b"TIME", _) => b"*2\r\n$2\r\n10\r\n$1\r\n0\r\n".to_vec(),
                            (b"EVAL", "stalls") => b"*3\r\n$-1\r\n*0\r\n$-1\r\n".to_vec(),
                            (b"EVAL", _) => {
                                let mut r = b"*3\r\n$-1\r\n*40\r\n".to_vec();
                                for _ in 0..40 {
                                    r.extend_from_slice(b"$60000\r\n");
                                    r.resize(r.len() + 60000, b'x');
                                    r.extend_from_slice(b"\r\n");
                                }
                                r
                            }
                            _ => b"*1\r\n*2\r\n$1\r\nl\r\n*0\r\n".to_vec(),
                        };
                        evals += usize::from(&name[..] == b"EVAL");
                        if s.write_all(&answer).is_err() {
                            return evals;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return evals,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
            let cfg = config_with_redis_at(addr);
            let layer = SharedLayer::new(&cfg).expect("a layer");
            let r = cfg.cache.redis.as_ref().expect("redis");
            let control = crate::control::Control::new(1);
            let stop = std::sync::atomic::AtomicBool::new(false);
            let mut cursor = LogCursor::at_start();
            let got = listen(r, &control, &layer, &mut cursor, &stop);
            let err = got.expect_err("dropped");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::InvalidData,
                "{hostile}: {err}"
            );
            let evals = server.join().expect("server");
            if hostile == "stalls" {
                assert_eq!(evals, MAX_LOG_STALLS as usize + 1);
            }
        }
    }

    /// `ListenOverflows` of `/proc/net/netstat`: SYNs dropped because a listener's accept
    /// queue was full.
    fn listen_overflows() -> Option<u64> {
        let t = std::fs::read_to_string("/proc/net/netstat").ok()?;
        let mut lines = t.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next()?, lines.next()?);
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        values.split_whitespace().nth(i)?.parse().ok()
    }

    /// The purge log's listener connects within a timeout of its own, at least
    /// [`LISTENER_TIMEOUT_MIN`], not the request path's `timeout` (20 ms here): before, a
    /// listener whose connect took longer (a loaded host, a Redis farther away) never
    /// followed the log. Here its first SYN is dropped (the stand-in's accept queue is full,
    /// RFC 6298 §2.1: sent again after 1 s): it connects once the queue has room.
    #[test]
    fn the_purge_log_listener_connects_with_a_timeout_longer_than_the_request_path_s() {
        use std::io::Read;
        let Some(before) = listen_overflows() else {
            return;
        };
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        // Backlog 0: one connection fills the accept queue.
        sock.listen(0).expect("listen");
        let l: std::net::TcpListener = sock.into();
        let addr = l.local_addr().expect("addr");
        let filler = std::net::TcpStream::connect(addr).expect("filler");
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"{addr}\"\ntimeout = \"20ms\"\n");
        let cfg = crate::config::Config::parse(&src, "t.toml").expect("config");
        let layer = SharedLayer::new(&cfg).expect("a layer");
        let listener = std::thread::spawn(move || {
            let r = cfg.cache.redis.as_ref().expect("redis");
            let control = crate::control::Control::new(1);
            let stop = std::sync::atomic::AtomicBool::new(false);
            listen(r, &control, &layer, &mut LogCursor::at_start(), &stop)
        });
        // Its SYN was dropped (counted); the queue then gets room.
        let end = Instant::now() + Duration::from_secs(10);
        while listen_overflows().is_some_and(|n| n == before) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (first, _) = l.accept().expect("the filler");
        drop((first, filler));
        l.set_nonblocking(true).expect("nonblocking");
        let mut conn = None;
        while conn.is_none() && !listener.is_finished() && Instant::now() < end {
            match l.accept() {
                Ok((s, _)) => conn = Some(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let mut s = conn.expect("the listener connected");
        s.set_nonblocking(false).expect("blocking");
        let mut got = [0u8; 14];
        s.read_exact(&mut got).expect("its first command");
        assert_eq!(&got, b"*1\r\n$4\r\nTIME\r\n");
        drop(s);
        let err = listener.join().expect("listener").expect_err("closed");
        assert_ne!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    }

    /// A Redis that answers a read of the purge log with random bytes: the listener drops
    /// the connection, counts it in [`SharedLayer::purge_log_errors`], logs one line (the
    /// second, within [`LOG_UNREADABLE_EVERY`], is counted and not logged) and follows the
    /// log again once it can. Before, bytes that hold no line end were taken for a late
    /// answer: nothing was logged or counted. The first stand-in's bytes begin as a reply
    /// (`+`) and never end one; the second's begin with a byte that starts no reply.
    #[test]
    fn a_purge_log_reply_of_random_bytes_is_logged_once_counted_and_the_listener_recovers() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut junk = |first: u8| -> Vec<u8> {
            let mut v = vec![first];
            while v.len() < 300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes()[0];
                if b != b'\n' && b != b'\r' {
                    v.push(b);
                }
            }
            v
        };
        let answers = [junk(b'+'), junk(0xad)];
        let msg = encode_purge(&Purge {
            target: PurgeTarget::Url(b"h/p".to_vec()),
            soft: false,
        });
        let mut entry = b"*3\r\n$-1\r\n*1\r\n*2\r\n$6\r\n9000-0\r\n*2\r\n$1\r\np\r\n".to_vec();
        entry.extend_from_slice(format!("${}\r\n", msg.len()).as_bytes());
        entry.extend_from_slice(&msg);
        entry.extend_from_slice(b"\r\n$6\r\n9000-0\r\n");
        let server = std::thread::spawn(move || {
            for conn in 0..3 {
                let Ok((mut s, _)) = l.accept() else { return };
                let (mut buf, mut chunk) = (bytes::BytesMut::new(), [0u8; 4096]);
                'conn: loop {
                    while let Ok(Some(BytesFrame::Array(a))) = crate::redis::decode_reply(&mut buf)
                    {
                        let answer = match a.first() {
                            Some(BytesFrame::BulkString(n)) if &n[..] == b"TIME" => {
                                b"*2\r\n$2\r\n10\r\n$1\r\n0\r\n".to_vec()
                            }
                            Some(BytesFrame::BulkString(n)) if &n[..] == b"EVAL" => {
                                match answers.get(conn) {
                                    Some(j) => j.clone(),
                                    None => entry.clone(),
                                }
                            }
                            _ => b"*-1\r\n".to_vec(),
                        };
                        if s.write_all(&answer).is_err() {
                            break 'conn;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        });
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n[cache.redis]\naddress = \"{addr}\"\nretry_interval = \"50ms\"\n");
        let cfg = crate::config::Config::parse(&src, "t.toml").expect("config");
        let layer = SharedLayer::new(&cfg).expect("a layer");
        let control = crate::control::Control::new(1);
        let stop = Arc::new(AtomicBool::new(false));
        let t = spawn_purge_listener(
            cfg.cache.redis.as_ref().expect("redis"),
            control,
            layer.clone(),
            stop.clone(),
        )
        .expect("listener");
        let end = Instant::now() + Duration::from_secs(20);
        while layer.purges_heard.load(Ordering::Relaxed) == 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        t.join().expect("listener");
        server.join().expect("server");
        assert_eq!(
            layer.purges_heard.load(Ordering::Relaxed),
            1,
            "it recovered"
        );
        assert_eq!(layer.purge_log_errors.load(Ordering::Relaxed), 2);
        assert_eq!(layer.purge_log_lines.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn scan_patterns_match_their_prefix_literally() {
        assert_eq!(&glob_prefix(b"r:u:h/a")[..], b"r:u:h/a*");
        assert_eq!(
            &glob_prefix(b"r:u:h/*?[x]\\")[..],
            b"r:u:h/\\*\\?\\[x\\]\\\\*"
        );
    }

    #[test]
    fn entries_round_trip_and_every_truncation_is_refused() {
        let o = Object {
            status: 200,
            reason: Bytes::from_static(b"OK"),
            fields: Fields::from_pairs([(&b"etag"[..], &b"\"x\""[..])]).expect("fits"),
            body: Bytes::from_static(b"hello"),
            t: Timing {
                response_time: 1_700_000_000,
                initial_age: 3,
                lifetime: 60,
                swr: 5,
                sie: 0,
                no_stale: true,
                always_validate: false,
            },
            url: b"h/a?b".to_vec().into(),
            tags: vec![b"t1".to_vec().into()],
            vary: vec![(b"accept-encoding".to_vec().into(), b"gzip".to_vec())],
            invalid: std::cell::Cell::new(false),
            born: std::cell::Cell::new(0),
        };
        let enc = Bytes::from(encode(&o));
        let d = decode(&enc).expect("decodes");
        assert_eq!(d.body, o.body);
        assert_eq!(d.fields, o.fields);
        assert_eq!(d.t.initial_age, 3);
        assert!(d.t.no_stale);
        assert_eq!(d.vary, o.vary);
        for n in 0..enc.len() {
            assert!(decode(&enc.slice(..n)).is_none(), "prefix {n}");
        }
        let mut bad = enc.to_vec();
        bad.push(0);
        assert!(decode(&Bytes::from(bad)).is_none());
        // A header value with CR LF is refused.
        let mut o2 = o;
        o2.fields = Fields::from_pairs([(&b"x"[..], &b"a\r\nb"[..])]).expect("fits");
        assert!(decode(&Bytes::from(encode(&o2))).is_none());
        // So is a framing field spelled with `_` (RFC 9112 §11.2): an entry of an older build.
        for name in [&b"Content_Length"[..], b"transfer_encoding"] {
            o2.fields = Fields::from_pairs([(name, &b"7"[..])]).expect("fits");
            assert!(decode(&Bytes::from(encode(&o2))).is_none());
        }
        o2.fields = Fields::from_pairs([(&b"x_length"[..], &b"7"[..])]).expect("fits");
        assert!(decode(&Bytes::from(encode(&o2))).is_some());
    }

    /// RWC3 carries its writer's place in the purge log and the stale mark of a soft purge;
    /// an RWC2 entry (the builds before) is still read, at no place (before every purge).
    #[test]
    fn entries_carry_their_place_in_the_purge_log_and_older_ones_are_read() {
        let o = Object {
            status: 200,
            reason: Bytes::from_static(b"OK"),
            body: Bytes::from_static(b"hello"),
            url: b"h/a".to_vec().into(),
            ..Object::default()
        };
        let enc = Bytes::from(encode_heard(&o, (1_700_000_000_123, 4)));
        let (d, heard) = decode_heard(&enc).expect("decodes");
        assert_eq!(heard, (1_700_000_000_123, 4));
        assert!(!d.invalid.get());
        o.invalid.set(true);
        let (d, _) = decode_heard(&Bytes::from(encode_heard(&o, (1, 0)))).expect("decodes");
        assert!(d.invalid.get(), "a soft-purged copy stays stale");
        // The same entry as RWC2 wrote it: no place, two flags.
        o.invalid.set(false);
        let mut old = enc.to_vec();
        old[..4].copy_from_slice(MAGIC_RWC2);
        old.drain(7..23);
        let (d, heard) = decode_heard(&Bytes::from(old.clone())).expect("an RWC2 entry");
        assert_eq!((heard, &d.body[..]), ((0, 0), &b"hello"[..]));
        old[6] = 4;
        assert!(
            decode_heard(&Bytes::from(old)).is_none(),
            "no third flag in RWC2"
        );
    }
}
