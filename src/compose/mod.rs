//! API composition and aggregation: a route action that makes several upstream calls for one
//! client request and answers with one JSON document.
//!
//! ```text
//!  config.rs    [routes.compose] + [[routes.compose.calls]] -> Plan (validated at load:
//!               ids, references, pointers, cycles, the last step, bounds)
//!  template.rs  ${request...} / ${calls...} / ${item}, parsed once, rendered per request
//!  exec.rs      calls start when what they refer to is there (independent ones at once);
//!               each sub-request goes through forward::try_endpoints (balancer, breaker,
//!               health, retries, pool) with an InMemory body; identical GETs made once
//!  merge.rs     shaping, per-item joins, and the merge in declared order
//! ```
//!
//! The answer never depends on which call finished first: every value is complete before
//! the merge, which walks the calls in declared order and settles conflicts by the route's
//! `on_conflict` rule.
//!
//! JSON is parsed and written with serde_json, already a dependency (well kept, and its
//! `IgnoredAny` validation pass and `Value` trees were fast enough here: see `perf/compose.sh`).
//! An answer that a template refers into, that is shaped, fanned out over or deep-merged is
//! parsed into a `Value` tree (bounded by `max_call_bytes` / `max_total_bytes`, nesting capped
//! at 128 by serde_json); any other answer is only validated and its top-level members are
//! spliced into the answer as they came (`merge::top_level`), which avoids a tree's many small
//! allocations (they were most of a composed request's CPU). Top-level keys are written in
//! sorted order (as serde_json's default `Map` does), so the answer's bytes are the same
//! whatever order the calls finished in.

pub mod config;
pub mod exec;
pub mod merge;
pub mod template;

pub use config::{ComposeConfig, ComposeError, Plan};
pub use exec::{run, Composed};
