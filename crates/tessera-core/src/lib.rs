//! Tessera's pure, deterministic core.
//!
//! It holds the whole cluster state (jobs, shards, attempts, nodes, GPUs, tenants,
//! checkpoints) as a state machine that every scheduler server applies the Raft log to, and the
//! placement planner that the leader runs. It does no IO and reads no clock: time, log indexes
//! and ids come in as arguments, so every server that applies the same commands reaches the
//! same state, and the planner gives the same plan for the same state and time.
//!
//! - [`spec`]: job specs, their TOML and one-line forms, validation with field and line.
//! - [`acl`]: principals, roles, tokens and [`acl::authorize`], the one authorization decision.
//! - [`model`]: the domain types.
//! - [`command`]: the versioned commands of the log, the events they produce, rejections.
//! - [`state`]: [`State::apply`], snapshot and restore, the invariants.
//! - [`xid`]: which XID errors are the program's fault and which the GPU's, and how long a
//!   faulty GPU stays out.
//! - [`timeline`]: each job's bounded history of events, and how they read.
//! - [`usage`]: GPU-hours and cost over a time range, grouped, counted from the timelines.
//! - [`placement`]: what a [`Plan`] is, and the constraints both the planner and apply check.
//! - [`planner`]: [`planner::plan`], gangs, constraints, topology, packing, fair share,
//!   quotas, backfill and preemption.

pub mod acl;
pub mod command;
pub mod model;
pub mod placement;
pub mod planner;
pub mod spec;
pub mod state;
pub mod timeline;
pub mod usage;
pub mod why;
pub mod xid;

#[cfg(test)]
mod tests;

pub use command::{ApplyContext, ApplyResult, Command, Event, ExitStatus, Rejection};
pub use model::{AttemptId, JobId, NodeId, Timestamp};
pub use planner::{Plan, PlanLimits, PlanOutput, plan};
pub use spec::{JobSpec, SpecError};
pub use state::State;
