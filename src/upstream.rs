//! Upstream groups as one worker sees them: endpoints, the balancer's state and a keep-alive
//! pool per endpoint. Everything here is owned by one worker thread (`Cell`/`RefCell`, no locks).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::net::TcpStream;

use crate::config::{Balance, UpstreamConfig};

/// Read buffer of an upstream connection; kept with the connection in the pool.
pub const UPSTREAM_READ_BUF: usize = 32 * 1024;

/// A connection to an upstream endpoint, with its read buffer.
pub struct UpConn {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    /// Came from the pool (it served a request before).
    pub reused: bool,
    pub endpoint: usize,
}

struct Idle {
    conn: UpConn,
    since: Instant,
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// The address as configured ("host:port"), used as Host when a route asks for it.
    pub authority: Box<[u8]>,
    pub weight: u32,
    idle: RefCell<Vec<Idle>>,
}

enum Balancer {
    RoundRobin {
        next: Cell<usize>,
    },
    /// Smooth weighted round robin: every pick adds each weight to its endpoint's current
    /// value, takes the largest and subtracts the total from it.
    Weighted {
        current: RefCell<Vec<i64>>,
        total: i64,
    },
}

pub struct UpstreamGroup {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    balancer: Balancer,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

impl UpstreamGroup {
    pub fn new(name: &str, cfg: &UpstreamConfig, worker: usize) -> Self {
        let endpoints: Vec<Endpoint> = cfg
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addr: e.address.addr,
                authority: e.address.text.as_bytes().into(),
                weight: e.weight,
                idle: RefCell::new(Vec::new()),
            })
            .collect();
        let all_equal = endpoints.iter().all(|e| e.weight == endpoints[0].weight);
        let balancer = match cfg.balance {
            Balance::WeightedRoundRobin if !all_equal => Balancer::Weighted {
                current: RefCell::new(vec![0; endpoints.len()]),
                total: endpoints.iter().map(|e| e.weight as i64).sum(),
            },
            // Workers start at different endpoints so that their first picks spread out.
            _ => Balancer::RoundRobin {
                next: Cell::new(worker % endpoints.len()),
            },
        };
        UpstreamGroup {
            name: name.to_string(),
            endpoints,
            balancer,
            max_idle: cfg.max_idle,
            idle_timeout: cfg.idle_timeout.0,
        }
    }

    /// Index of the endpoint for the next request.
    #[inline]
    pub fn pick(&self) -> usize {
        match &self.balancer {
            Balancer::RoundRobin { next } => {
                let i = next.get();
                next.set(if i + 1 >= self.endpoints.len() {
                    0
                } else {
                    i + 1
                });
                i
            }
            Balancer::Weighted { current, total } => {
                let mut cur = current.borrow_mut();
                let mut best = 0;
                for (i, e) in self.endpoints.iter().enumerate() {
                    cur[i] += e.weight as i64;
                    if cur[i] > cur[best] {
                        best = i;
                    }
                }
                cur[best] -= total;
                best
            }
        }
    }

    /// An idle pooled connection to endpoint `ep` that is still open, most recent first.
    pub fn checkout(&self, ep: usize) -> Option<UpConn> {
        let mut idle = self.endpoints[ep].idle.borrow_mut();
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if since.elapsed() >= self.idle_timeout || !still_open(&conn.stream) {
                continue;
            }
            conn.reused = true;
            return Some(conn);
        }
        None
    }

    /// Returns a connection to the pool after a complete response.
    pub fn checkin(&self, conn: UpConn) {
        let mut idle = self.endpoints[conn.endpoint].idle.borrow_mut();
        if idle.len() >= self.max_idle {
            // Keep the newest: drop the oldest idle connection.
            if self.max_idle == 0 {
                return;
            }
            idle.remove(0);
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes idle connections older than the idle timeout. Returns how many were closed.
    pub fn sweep(&self) -> usize {
        let mut closed = 0;
        for e in &self.endpoints {
            let mut idle = e.idle.borrow_mut();
            let before = idle.len();
            idle.retain(|i| i.since.elapsed() < self.idle_timeout);
            closed += before - idle.len();
        }
        closed
    }

    pub fn idle_count(&self) -> usize {
        self.endpoints.iter().map(|e| e.idle.borrow().len()).sum()
    }

    pub fn clear_idle(&self) {
        for e in &self.endpoints {
            e.idle.borrow_mut().clear();
        }
    }
}

/// Did the upstream close (or send something on) an idle connection? A non-blocking peek:
/// 0 bytes means FIN, data means an unexpected response; either way the connection is unusable.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: recv into a valid one-byte buffer on a socket fd we own.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        return err.kind() == std::io::ErrorKind::WouldBlock;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn group(balance: &str, weights: &[u32]) -> UpstreamGroup {
        let eps: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ address = \"127.0.0.1:{}\", weight = {w} }}", 9000 + i))
            .collect();
        let src = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nbalance = \"{balance}\"\nendpoints = [{}]\n",
            eps.join(", ")
        );
        let cfg = Config::parse(&src, "t").unwrap();
        UpstreamGroup::new("u", &cfg.upstreams["u"], 0)
    }

    #[test]
    fn round_robin_cycles() {
        let g = group("round_robin", &[1, 1, 1]);
        let picks: Vec<usize> = (0..6).map(|_| g.pick()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weighted_spreads_by_weight() {
        let g = group("weighted_round_robin", &[5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| g.pick()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 5);
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 1);
        // Smooth: the heavy endpoint is not picked five times in a row.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }
}
