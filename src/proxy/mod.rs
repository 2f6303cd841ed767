//! A request's life on a worker.
//!
//! ```text
//!  conn.rs     wait (512 B, no timer) ─► read head ─► RequestCtx::new ┐
//!                                                                     ▼
//!  phases.rs   route ─► client cert ─► auth ─► rate limits ─► concurrency ─► body limit
//!                 │                                                        │
//!                 └──► direct answer                    forward.rs ◄───────┘
//!                                                           │ endpoint, retries, breaker
//!  attempt.rs            connection (pooled/new) ─► head + body ─► 1xx ─► response head
//!  relay.rs              request body from the client ─┘        response body to the client
//!                                                                     │
//!  conn.rs     finish: the one place that writes a gateway-made answer and decides, from
//!              the request body's state, whether the connection goes on (drain or close)
//! ```
//!
//! - [`worker`]: what one worker owns, including the configuration snapshot a request holds
//!   for its whole life.
//! - [`conn`]: the connection loop, the head reader, the rescue (`Conn::finish`), draining and
//!   the lingering close.
//! - [`ctx`]: the per-request context and the request body's state.
//! - [`phases`]: the phases in order.
//! - [`forward`]: the upstream phase around attempts.
//! - [`attempt`]: one upstream attempt as a function, callable by anything with a
//!   [`attempt::Downstream`].
//! - [`relay`]: the body relays.
//! - [`record`]: the end of a request: metrics and the access log line, in one step.
//! - [`slab`]: reusable blocks for request futures, so an idle connection holds little.

pub mod attempt;
pub mod conn;
pub mod ctx;
pub mod forward;
pub mod phases;
pub mod record;
pub mod relay;
pub mod slab;
pub mod worker;

pub use conn::{serve, ClientIo, ConnInfo, CLOSE_NOTIFY_TIMEOUT};
pub use worker::{BufPool, ListenerRt, Shared, Shutdown, Snapshot, Timeouts, Worker};
