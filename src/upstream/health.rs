//! Endpoint health shared by all workers: active checks run once per gateway on their own
//! thread, passive ejections are decided by whichever worker sees the failures, and every
//! worker copies the result into its own balancer state every 50 ms (off the request path).
//! So all workers agree on what is routable within 50 ms of a change.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, HealthCheckConfig, OutlierConfig};
use crate::http::client;
use crate::tls::UpstreamTls;
use crate::upstream::UpstreamGroup;
use crate::{debug, info, warn};

#[derive(Clone, Copy, Debug)]
struct Shared {
    /// Passing active checks (true when the group has none).
    active_ok: bool,
    ejected_until: Option<Instant>,
    /// Ejections so far; each doubles the next ejection time. Forgotten after a calm period.
    ejections: u32,
    last_ejection_end: Option<Instant>,
}

/// The result of [`HealthHub::try_eject`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// Ejected now, for this long.
    Ejected(Duration),
    /// Another worker ejected it already.
    Already,
    /// Refused: the group's ejection cap is reached.
    Refused,
}

/// One endpoint's shared health, as [`HealthHub::endpoint`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointHealth {
    /// Passing active checks (always true for a group without them).
    pub active_ok: bool,
    /// Ejected by outlier detection for this much longer.
    pub ejected_for: Option<Duration>,
    /// Ejections counted towards the next ejection's length.
    pub ejections: u32,
}

/// Health of every endpoint of every upstream group, indexed [slot][endpoint]. A group's slot
/// is its index in config order at start; a reload keeps the slot of a group by name and gives
/// a new name the next free one ([`HealthHub::relayout`]), so that health follows a group
/// across reloads. Every lookup is bounds-checked: a request still holding the snapshot
/// before a reload may name an endpoint the new layout does not have.
pub struct HealthHub {
    state: Mutex<Vec<Vec<Shared>>>,
    /// The group name of each slot, whether it is that name's current slot (taken only by
    /// reloads), and the endpoints it was laid out for (configured text and address), so that
    /// a changed group's endpoints that stayed the same keep their health.
    names: Mutex<Vec<(String, bool, Vec<EndpointKey>)>>,
}

/// What makes an endpoint the same across a reload: its configured address text and what it
/// resolved to.
type EndpointKey = (String, SocketAddr);

fn endpoint_keys(u: &crate::config::UpstreamConfig) -> Vec<EndpointKey> {
    u.endpoints
        .iter()
        .map(|e| (e.address.text.clone(), e.address.addr))
        .collect()
}

/// The health a changed group's endpoint starts with: what its slot recorded for the same
/// endpoint in the group's previous layout (the first not yet taken, for an address listed
/// twice), less what the new config no longer checks (no active checks: passing; outlier
/// detection off: not ejected), else [`FRESH`].
fn carried(
    key: &EndpointKey,
    u: &crate::config::UpstreamConfig,
    before: &[EndpointKey],
    state: &[Shared],
    taken: &mut [bool],
) -> Shared {
    let found = before
        .iter()
        .zip(state)
        .zip(taken.iter_mut())
        .find(|((k, _), t)| *k == key && !**t);
    let Some(((_, s), t)) = found else {
        return FRESH;
    };
    *t = true;
    let mut s = *s;
    if u.health_check.is_none() {
        s.active_ok = true;
    }
    if u.outlier.consecutive_failures == 0 {
        s.ejected_until = None;
        s.ejections = 0;
        s.last_ejection_end = None;
    }
    s
}

/// Health of an endpoint before anything is known about it.
const FRESH: Shared = Shared {
    active_ok: true,
    ejected_until: None,
    ejections: 0,
    last_ejection_end: None,
};

impl HealthHub {
    pub fn new(cfg: &Config) -> Arc<HealthHub> {
        let state = cfg
            .upstreams
            .values()
            .map(|u| {
                vec![
                    Shared {
                        active_ok: true,
                        ejected_until: None,
                        ejections: 0,
                        last_ejection_end: None,
                    };
                    u.endpoints.len()
                ]
            })
            .collect();
        Arc::new(HealthHub {
            state: Mutex::new(state),
            names: Mutex::new(
                cfg.upstreams
                    .iter()
                    .map(|(n, u)| (n.clone(), true, endpoint_keys(u)))
                    .collect(),
            ),
        })
    }

    /// The slot of each group of `cfg` (config order), keeping a known name's current slot;
    /// a group in `reset` (a new or changed group) moves to its name's other slot, sized to
    /// its endpoints: requests still running on the old group (and the old health checker,
    /// until it stops) report their failures to the old slot, never to the new group's
    /// endpoints. In the new slot, an endpoint the group had before (same address text, same
    /// resolved address) starts from the health its old slot recorded (active checks,
    /// ejection and its back-off; issue 11: the health and ejections of unchanged endpoints
    /// carry over); the others start fresh. Slots are never freed: at most two per group
    /// name ever configured.
    pub fn relayout(&self, cfg: &Config, reset: &dyn Fn(&str) -> bool) -> Vec<usize> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let mut slots = Vec::with_capacity(cfg.upstreams.len());
        for (name, u) in &cfg.upstreams {
            let current = names.iter().position(|(n, cur, _)| n == name && *cur);
            let fresh = reset(name) || current.is_none();
            let keys = endpoint_keys(u);
            let slot = match current {
                Some(s) if !fresh => s,
                _ => {
                    let other = names
                        .iter()
                        .enumerate()
                        .position(|(i, (n, _, _))| n == name && Some(i) != current);
                    let s = match other {
                        Some(s) => s,
                        None => {
                            names.push((name.clone(), false, Vec::new()));
                            names.len() - 1
                        }
                    };
                    while st.len() <= s {
                        st.push(Vec::new());
                    }
                    let next = match current {
                        Some(c) => {
                            names[c].1 = false;
                            let before = &names[c].2;
                            let mut taken = vec![false; before.len()];
                            let old = st.get(c).map_or(&[][..], Vec::as_slice);
                            keys.iter()
                                .map(|k| carried(k, u, before, old, &mut taken))
                                .collect()
                        }
                        None => vec![FRESH; u.endpoints.len()],
                    };
                    st[s] = next;
                    names[s].1 = true;
                    s
                }
            };
            while st.len() <= slot {
                st.push(Vec::new());
            }
            if st[slot].len() != u.endpoints.len() {
                st[slot] = vec![FRESH; u.endpoints.len()];
            }
            names[slot].2 = keys;
            slots.push(slot);
        }
        slots
    }

    /// Whether active checks pass for the endpoint (true when unknown).
    pub fn is_active(&self, group: usize, ep: usize) -> bool {
        self.lock()
            .get(group)
            .and_then(|g| g.get(ep))
            .is_none_or(|s| s.active_ok)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<Shared>>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_active(&self, group: usize, ep: usize, ok: bool) {
        if let Some(s) = self.lock().get_mut(group).and_then(|g| g.get_mut(ep)) {
            s.active_ok = ok;
        }
    }

    /// Ejects an endpoint after repeated failures, unless that would put more than
    /// `max_ejection_percent` of the group out (at least one endpoint always stays).
    pub fn try_eject(&self, group: usize, ep: usize, o: &OutlierConfig, now: Instant) -> Ejection {
        let mut st = self.lock();
        let Some(g) = st.get_mut(group).filter(|g| ep < g.len()) else {
            return Ejection::Refused;
        };
        if g[ep].ejected_until.is_some_and(|t| t > now) {
            return Ejection::Already;
        }
        let n = g.len();
        let ejected = g
            .iter()
            .filter(|s| s.ejected_until.is_some_and(|t| t > now))
            .count();
        let allowed = ((n * o.max_ejection_percent as usize) / 100).min(n - 1);
        if ejected + 1 > allowed {
            return Ejection::Refused;
        }
        let s = &mut g[ep];
        // A long calm since the last ejection forgets earlier ones.
        if s.last_ejection_end
            .is_some_and(|end| now.saturating_duration_since(end) > o.max_ejection_time.0)
        {
            s.ejections = 0;
        }
        let factor = 1u32 << s.ejections.min(16);
        let d = (o.base_ejection_time.0 * factor).min(o.max_ejection_time.0);
        s.ejections += 1;
        s.ejected_until = Some(now + d);
        s.last_ejection_end = Some(now + d);
        Ejection::Ejected(d)
    }

    /// One endpoint's shared health as of `now` (for the admin API); `None` for an index
    /// out of range.
    pub fn endpoint(&self, group: usize, ep: usize, now: Instant) -> Option<EndpointHealth> {
        let st = self.lock();
        let s = st.get(group)?.get(ep)?;
        Some(EndpointHealth {
            active_ok: s.active_ok,
            ejected_for: s
                .ejected_until
                .map(|t| t.saturating_duration_since(now))
                .filter(|d| !d.is_zero()),
            ejections: s.ejections,
        })
    }

    /// Copies routability into a worker's groups.
    pub fn sync(&self, groups: &[std::rc::Rc<UpstreamGroup>], now: Instant) {
        let st = self.lock();
        for group in groups {
            group.coarse_now.set(now);
            for e in 0..group.endpoints.len() {
                let Some(&s) = st.get(group.index).and_then(|g| g.get(e)) else {
                    continue;
                };
                let routable = s.active_ok && s.ejected_until.is_none_or(|t| t <= now);
                group.stats[e].routable.set(routable);
            }
        }
    }
}

/// Starts the active health checker thread when some group has `health_check`. `tls`: each
/// group's upstream TLS (checks of a TLS group go over TLS, verified the same way).
pub fn spawn_checker(
    cfg: &Config,
    hub: Arc<HealthHub>,
    stop: Arc<AtomicBool>,
    tls: &[Option<Arc<UpstreamTls>>],
) -> Option<JoinHandle<()>> {
    let slots: Vec<usize> = (0..cfg.upstreams.len()).collect();
    spawn_checker_slots(cfg, &slots, hub, stop, tls)
}

/// [`spawn_checker`] for groups at hub slots `slots` (config order): what a reload starts.
/// Each check begins from the health the hub already records for its endpoint.
pub fn spawn_checker_slots(
    cfg: &Config,
    slots: &[usize],
    hub: Arc<HealthHub>,
    stop: Arc<AtomicBool>,
    tls: &[Option<Arc<UpstreamTls>>],
) -> Option<JoinHandle<()>> {
    let mut targets = Vec::new();
    for ((i, u), &g) in cfg.upstreams.values().enumerate().zip(slots) {
        if let Some(hc) = &u.health_check {
            for (e, ep) in u.endpoints.iter().enumerate() {
                let host = hc.host.clone().unwrap_or_else(|| ep.address.text.clone());
                let target = Target {
                    addr: ep.address.addr,
                    tls: tls.get(i).cloned().flatten(),
                    ep: e,
                };
                targets.push((g, e, target, host, hc.clone()));
            }
        }
    }
    if targets.is_empty() {
        return None;
    }
    std::thread::Builder::new()
        .name("ringway-health".into())
        .spawn(move || {
            let mut rt = match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!("health checker: cannot build a runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let _late = crate::tls::LateCloses::allow();
                let mut tasks = Vec::new();
                for (g, e, target, host, hc) in targets {
                    let hub = hub.clone();
                    let stop = stop.clone();
                    tasks.push(monoio::spawn(check_loop(g, e, target, host, hc, hub, stop)));
                }
                for t in tasks {
                    t.await;
                }
            });
        })
        .ok()
}

/// Where one check goes.
struct Target {
    addr: SocketAddr,
    tls: Option<Arc<UpstreamTls>>,
    /// Index of the endpoint in its group (for its TLS name).
    ep: usize,
}

async fn check_loop(
    g: usize,
    e: usize,
    target: Target,
    host: String,
    hc: HealthCheckConfig,
    hub: Arc<HealthHub>,
    stop: Arc<AtomicBool>,
) {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringway-health-check\r\nConnection: close\r\n\r\n",
        hc.path
    );
    let addr = target.addr;
    let mut healthy = hub.is_active(g, e);
    let (mut passes, mut fails) = (0u32, 0u32);
    while !stop.load(Ordering::Relaxed) {
        let expected = |status: u16| {
            if hc.expected_statuses.is_empty() {
                (200..400).contains(&status)
            } else {
                hc.expected_statuses.contains(&status)
            }
        };
        let ok = check_once(&target, request.as_bytes(), expected, hc.timeout.0)
            .await
            .is_some_and(expected);
        if ok {
            passes += 1;
            fails = 0;
            if !healthy && passes >= hc.healthy_threshold {
                healthy = true;
                hub.set_active(g, e, true);
                info!("health check: {addr} is healthy again");
            }
        } else {
            fails += 1;
            passes = 0;
            if healthy && fails >= hc.unhealthy_threshold {
                healthy = false;
                hub.set_active(g, e, false);
                warn!("health check: {addr} failed {fails} checks in a row; taken out");
            }
        }
        // Sleep the interval in short steps so that shutdown is prompt.
        let end = Instant::now()
            .checked_add(hc.interval.0)
            .unwrap_or_else(Instant::now);
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            monoio::time::sleep((end - Instant::now()).min(Duration::from_millis(100))).await;
        }
    }
}

/// Most bytes of a health-check answer's body read (and thrown away, never held). The check
/// judges the status: past this the rest is left unread and the status stands, so a large
/// health page passes; a body that ends within it must be well framed.
pub const MAX_HEALTH_DRAIN: usize = 1024 * 1024;

/// One check within `timeout` (connect included): the status of the answer to a GET, or None
/// on any failure (a malformed answer, a close mid-answer, the deadline). `expected`: the
/// statuses that pass; the body of any other answer is not read.
async fn check_once(
    target: &Target,
    request: &[u8],
    expected: impl Fn(u16) -> bool,
    timeout: Duration,
) -> Option<u16> {
    let to = client::Target {
        addr: target.addr,
        tls: target.tls.clone().map(|t| (t, target.ep)),
    };
    match client::fetch_status(&to, request.to_vec(), expected, MAX_HEALTH_DRAIN, timeout).await {
        Ok(status) => Some(status),
        Err(e) => {
            debug!("health check of {}: {e}", target.addr);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_group_alternates_between_two_slots_and_a_kept_one_stays() {
        let cfg = |port: u16| {
            let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.k]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:{port}\" }}]\n");
            Config::parse(&src, "t.toml").unwrap()
        };
        let hub = HealthHub::new(&cfg(1));
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000u16 {
            let slots = hub.relayout(&cfg(1 + i % 2), &|n| n == "u");
            assert_eq!(slots[0], 0, "the kept group keeps its slot");
            seen.insert(slots[1]);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(hub.lock().len(), 3);
    }

    #[test]
    fn a_changed_group_keeps_the_health_of_its_unchanged_endpoints() {
        let cfg = |eps: &str, extra: &str| {
            let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{eps}]\n{extra}");
            Config::parse(&src, "t.toml").unwrap()
        };
        let a = "{ address = \"127.0.0.1:1\" }";
        let b = "{ address = \"127.0.0.1:2\" }";
        let hc = "[upstreams.u.health_check]\npath = \"/\"\n";
        let start = cfg(&format!("{a}, {b}, {a}"), hc);
        let hub = HealthHub::new(&start);
        let o = OutlierConfig::default();
        let now = Instant::now();
        // Endpoint 0 (a) is ejected, endpoint 2 (a again) fails its checks, b is well.
        assert!(matches!(hub.try_eject(0, 0, &o, now), Ejection::Ejected(_)));
        hub.set_active(0, 2, false);
        // Reordered, with a new endpoint: each keeps its own record, in order for the address
        // listed twice; the new one starts fresh.
        let c = "{ address = \"127.0.0.1:3\" }";
        let slots = hub.relayout(&cfg(&format!("{c}, {a}, {b}, {a}"), hc), &|_| true);
        let g = slots[0];
        let h = |e| hub.endpoint(g, e, now).unwrap();
        assert!(h(0).active_ok && h(0).ejected_for.is_none());
        assert!(h(1).ejected_for.is_some() && h(1).ejections == 1);
        assert!(h(2).active_ok && h(2).ejected_for.is_none());
        assert!(!h(3).active_ok && h(3).ejected_for.is_none());
        // Without active checks and with outlier detection off, nothing is carried that the
        // new config no longer decides.
        let off = "[upstreams.u.outlier]\nconsecutive_failures = 0\n";
        let slots = hub.relayout(&cfg(&format!("{c}, {a}, {b}, {a}"), off), &|_| true);
        for e in 0..4 {
            let h = hub.endpoint(slots[0], e, now).unwrap();
            assert!(
                h.active_ok && h.ejected_for.is_none() && h.ejections == 0,
                "{e}"
            );
        }
    }

    #[test]
    fn ejection_is_capped_and_backs_off() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:1\" }, { address = \"127.0.0.1:2\" }, { address = \"127.0.0.1:3\" }, { address = \"127.0.0.1:4\" }]\n";
        let cfg = Config::parse(src, "t").unwrap();
        let hub = HealthHub::new(&cfg);
        let o = OutlierConfig::default();
        let now = Instant::now();
        assert_eq!(
            hub.try_eject(0, 0, &o, now),
            Ejection::Ejected(Duration::from_secs(5))
        );
        assert_eq!(hub.try_eject(0, 0, &o, now), Ejection::Already);
        assert!(matches!(hub.try_eject(0, 1, &o, now), Ejection::Ejected(_)));
        // 50% of 4 are out: a third is refused.
        assert_eq!(hub.try_eject(0, 2, &o, now), Ejection::Refused);
        // After the first ejection ends, a second one lasts twice as long.
        let later = now + Duration::from_secs(6);
        assert_eq!(
            hub.try_eject(0, 0, &o, later),
            Ejection::Ejected(Duration::from_secs(10))
        );
    }
}
