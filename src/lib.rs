//! ringway: an API gateway on monoio, thread-per-core.
//!
//! Layout, in the order a request meets it:
//! - [`server`]: worker threads, one monoio runtime each (io_uring or epoll), listeners bound
//!   per worker with `SO_REUSEPORT`, graceful shutdown.
//! - [`proxy`]: a request's life: the connection loop and its one rescue (`conn`), the
//!   per-request context (`ctx`), the phases in order (`phases`), the upstream phase around
//!   attempts (`forward`), one upstream attempt as a function (`attempt`), the body relays
//!   (`relay`), and what a worker owns (`worker`).
//! - [`http`]: the HTTP/1.1 codec (httparse over `bytes`, framing rules, chunked scanner).
//! - [`router`]: the per-worker route table.
//! - [`upstream`]: per-worker upstream groups, balancers and keep-alive pools.
//! - [`config`]: the TOML file, typed and validated.
//! - [`auth`]: JWT, API keys and consumers, OAuth2 introspection, per-route policies.
//! - [`error`]: gateway-made errors and the one place that maps them to responses.
//! - [`tls`]: rustls configs for listeners and upstreams, the server handshake.
//! - [`compose`]: the `compose` route action (several upstream calls, one JSON answer).
//! - [`control`]: per-worker mailboxes through which the admin API and reloads reach workers.
//! - [`admin`]: the admin API listener, on its own thread off the data plane.
//! - [`reload`]: hot reload at request boundaries; [`upgrade`]: handing listening sockets to a
//!   new process (zero-downtime binary upgrade).
//! - [`cache`]: the response cache (RFC 9111), one store per worker.
//! - [`metrics`]: per-worker counters summed when scraped, the Prometheus text format.
//! - [`access_log`]: JSON lines per request through per-worker buffers and writer threads.
//! - [`trace`]: W3C trace context (`traceparent`, `tracestate`).
//! - [`log`]: the event log (text or JSON, level settable at run time).

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod cache;
pub mod compose;
pub mod config;
pub mod control;
pub mod date;
pub mod demo;
pub mod doorbell;
pub mod error;
pub mod http;
pub mod local;
pub mod log;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod redis;
pub mod reload;
pub mod retry;
pub mod rewrite;
pub mod router;
pub mod server;
pub mod tls;
pub mod trace;
pub mod upgrade;
pub mod upstream;
pub mod window;
