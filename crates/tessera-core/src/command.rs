//! Commands (what the Raft log carries), the events applying them produces, and rejections.
//!
//! A command is encoded in a versioned envelope so that a log written by one release can be
//! replayed by the next. Decoding refuses versions it does not know instead of guessing.
//! Fields added to a command within a version are `#[serde(default)]` and left out when they
//! hold their default, so older entries decode and unchanged commands encode as before (the
//! tenant settings, `mode`, `priority_defaulted` and `submitted_by` came this way).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{
    AttemptId, DEFAULT_GPU_HOURS_WINDOW_MS, DrainReason, JobId, JobState, NodeId, NodeInfo, NodeState, ShardState,
    StopReason, Timestamp,
};
use crate::placement::Plan;
use crate::spec::{JobSpec, SpecError};

/// The command encoding this build writes. It reads every version up to this one.
pub const COMMAND_VERSION: u32 = 1;

/// Largest encoded command accepted (a plan for many thousands of shards fits).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024 * 1024;

/// What comes with each applied command: its log position and the time its proposer stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyContext {
    /// Raft log index of the entry.
    pub index: u64,
    /// The time the proposing server stamped on the entry.
    pub now: Timestamp,
}

/// How a shard process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }
}

/// Every change to the cluster state. Applied in log order by every server.
#[allow(
    clippy::large_enum_variant,
    reason = "a command is built once and moved into apply; boxing the spec would change every constructor"
)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Accept a job. Its id is the next free one.
    SubmitJob {
        /// The spec; validated again on apply.
        spec: JobSpec,
        /// Client-chosen key making retries safe: a second submission with the same tenant and
        /// key returns the first job instead of creating another. At most 128 bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// The spec's priority was not given by the user (it holds the spec default): the
        /// tenant's `default_priority`, if set, replaces it; without one, it is lowered to the
        /// tenant's `max_priority` if above it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        priority_defaulted: bool,
        /// The identity that submitted the job, as the server authenticated it (like
        /// "user/alice" or "token/ci"); recorded as `Job::submitted_by`. At most
        /// [`crate::state::MAX_SUBMITTED_BY`] bytes, no control characters.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        submitted_by: Option<String>,
    },
    /// Cancel a job: pending shards end at once, live ones are asked to stop.
    CancelJob {
        /// Which job.
        job: JobId,
        /// Why, for people.
        reason: Option<String>,
    },
    /// An agent registered (first time, or again after a restart or reconnect).
    RegisterNode {
        /// What it reported.
        info: NodeInfo,
    },
    /// The leader lost a node: its shards are requeued from their checkpoints.
    MarkNodeDown {
        /// Which node.
        node: NodeId,
        /// Why, for people.
        reason: String,
        /// The node's registration (`Node::registration`) the leader judged; if the agent has
        /// registered again since, the command is refused: the node is back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        registration: Option<u64>,
    },
    /// Take a node out of placement and move its shards (operator drain or spot notice).
    DrainNode {
        /// Which node.
        node: NodeId,
        /// Why.
        reason: DrainReason,
        /// When the node goes away; shards that declared a runtime ending before it may finish.
        deadline: Option<Timestamp>,
    },
    /// Put a draining node back into placement.
    UndrainNode {
        /// Which node.
        node: NodeId,
    },
    /// Mark one GPU healthy or unhealthy (an XID or ECC error its agent saw, an operator
    /// clearing it, or the end of a hardware fault's cool-down). See [`crate::xid`].
    SetGpuHealth {
        /// Which node.
        node: NodeId,
        /// GPU index on the node.
        gpu: u32,
        /// New health.
        healthy: bool,
        /// What was seen, like "XID 79".
        reason: String,
        /// The XID of an unhealthy report: an application XID leaves the GPU in service.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        xid: Option<u32>,
        /// A healthy report that ends a cool-down (the leader's, when it passed): it applies only
        /// to a GPU whose cool-down has ended, and keeps its faults; an operator's clears them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cool_down: bool,
    },
    /// An attempt ran past its job's `max_runtime` (the leader saw it): the job's live shards
    /// are stopped and the job fails with "time limit". Checked again at apply.
    TimeLimit {
        /// The job.
        job: JobId,
        /// The attempt that ran too long.
        attempt: AttemptId,
    },
    /// Running shards of a job reported no new step within its `progress_timeout` (the leader
    /// judged it from the heartbeats, which are not in the log): they are stopped and the gang
    /// restarts from its checkpoint.
    Stalled {
        /// The job.
        job: JobId,
        /// The stalled attempts (ranks).
        attempts: Vec<AttemptId>,
    },
    /// A draining node's deadline passed (the leader saw it): the shards still on it are asked
    /// to checkpoint and stop, and are requeued. Checked again at apply.
    DrainDeadline {
        /// The node.
        node: NodeId,
    },
    /// A placement plan computed by the leader; re-checked against the current state.
    ApplyPlan {
        /// The plan.
        plan: Plan,
    },
    /// The agent started the attempt's process.
    ShardStarted {
        /// Which attempt.
        attempt: AttemptId,
    },
    /// The attempt's process ended.
    ShardExited {
        /// Which attempt.
        attempt: AttemptId,
        /// How.
        exit: ExitStatus,
        /// The node or a GPU was at fault, not the job's code: no retry budget is used.
        node_fault: bool,
        /// Last words, for people.
        message: Option<String>,
    },
    /// The attempt wrote a durable checkpoint.
    RecordCheckpoint {
        /// Which attempt.
        attempt: AttemptId,
        /// Training step it holds.
        step: u64,
        /// Where it is.
        uri: String,
    },
    /// Create or change a tenant. Every setting is replaced (a field left out means "none"),
    /// so a partial change is a read-modify-write; usage is kept.
    SetTenant {
        /// Name.
        name: String,
        /// Share weight, 1 to 10,000.
        weight: u32,
        /// GPU quota across all clouds; None: none.
        gpu_quota: Option<u64>,
        /// Highest priority the tenant's jobs may ask for, 0 to `spec::limits::MAX_PRIORITY`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_priority: Option<u16>,
        /// Priority given to its jobs submitted without one; at most `max_priority`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default_priority: Option<u16>,
        /// GPU-hours per window across all clouds (finite, above 0); None: no quota.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpu_hours_quota: Option<f64>,
        /// GPU-hours per window on one cloud ("aws", "azure" or "none"; finite, above 0).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        cloud_gpu_hours_quota: BTreeMap<String, f64>,
        /// Length of the GPU-hours window in milliseconds, one minute to 366 days (default
        /// [`DEFAULT_GPU_HOURS_WINDOW_MS`], 7 days).
        #[serde(default = "default_window_ms", skip_serializing_if = "is_default_window_ms")]
        gpu_hours_window_ms: u64,
        /// Create, update or either.
        #[serde(default, skip_serializing_if = "TenantWrite::is_upsert")]
        mode: TenantWrite,
    },
    /// Change the fair-share half-life.
    SetFairShareHalfLife {
        /// Half-life of GPU-hour usage, in milliseconds (at least one minute).
        half_life_ms: u64,
    },
    /// Bootstrap ACLs, create or revoke a token.
    Acl {
        /// The change.
        change: crate::acl::AclChange,
    },
}

/// Whether [`Command::SetTenant`] may create the tenant, change it, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantWrite {
    /// Create it if missing, else change it (the behaviour before modes existed).
    #[default]
    Upsert,
    /// Create it; refused with [`Rejection::TenantExists`] if it exists.
    Create,
    /// Change it; refused with [`Rejection::UnknownTenant`] if it does not exist.
    Update,
}

impl TenantWrite {
    /// The default mode.
    pub fn is_upsert(&self) -> bool {
        *self == TenantWrite::Upsert
    }
}

fn default_window_ms() -> u64 {
    DEFAULT_GPU_HOURS_WINDOW_MS
}

fn is_default_window_ms(ms: &u64) -> bool {
    *ms == DEFAULT_GPU_HOURS_WINDOW_MS
}

#[derive(Serialize, Deserialize)]
struct Envelope<C> {
    v: u32,
    #[serde(flatten)]
    cmd: C,
}

/// A command could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_COMMAND_BYTES`].
    #[error("command is {0} bytes, larger than the {MAX_COMMAND_BYTES}-byte limit")]
    TooLarge(usize),
    /// Written by a newer release.
    #[error("command version {0} is newer than this build understands ({COMMAND_VERSION}); upgrade this server")]
    UnknownVersion(u32),
    /// Not a command.
    #[error("malformed command: {0}")]
    Malformed(String),
}

impl Command {
    /// Encode for the log.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(&Envelope { v: COMMAND_VERSION, cmd: self }).unwrap_or_default()
    }

    /// Decode from the log.
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let ver: Version = serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if ver.v == 0 || ver.v > COMMAND_VERSION {
            return Err(DecodeError::UnknownVersion(ver.v));
        }
        let env: Envelope<Command> =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        Ok(env.cmd)
    }

    /// Whether applying this command twice does what applying it once does, so that a proposal
    /// whose outcome is unknown (its leader died) may be proposed again: a submission with an
    /// idempotency key (the second finds the first's job).
    pub fn repeatable(&self) -> bool {
        matches!(self, Command::SubmitJob { idempotency_key: Some(_), .. })
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::SubmitJob { .. } => "submit_job",
            Command::CancelJob { .. } => "cancel_job",
            Command::RegisterNode { .. } => "register_node",
            Command::MarkNodeDown { .. } => "mark_node_down",
            Command::DrainNode { .. } => "drain_node",
            Command::UndrainNode { .. } => "undrain_node",
            Command::SetGpuHealth { .. } => "set_gpu_health",
            Command::TimeLimit { .. } => "time_limit",
            Command::Stalled { .. } => "stalled",
            Command::DrainDeadline { .. } => "drain_deadline",
            Command::ApplyPlan { .. } => "apply_plan",
            Command::ShardStarted { .. } => "shard_started",
            Command::ShardExited { .. } => "shard_exited",
            Command::RecordCheckpoint { .. } => "record_checkpoint",
            Command::SetTenant { .. } => "set_tenant",
            Command::SetFairShareHalfLife { .. } => "set_fair_share_half_life",
            Command::Acl { .. } => "acl",
        }
    }
}

/// What applying a command changed. The server turns these into messages to agents and
/// watchers; they are not stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A job was accepted.
    JobSubmitted {
        /// Its id.
        job: JobId,
        /// True when the idempotency key matched an earlier submission: no new job.
        deduplicated: bool,
    },
    /// A job changed state.
    JobStateChanged {
        /// Which.
        job: JobId,
        /// New state.
        state: JobState,
    },
    /// A shard was placed: tell its agent to start it.
    ShardAssigned {
        /// Job.
        job: JobId,
        /// Shard index.
        shard: u32,
        /// New attempt.
        attempt: AttemptId,
        /// Attempt number of the shard.
        number: u32,
        /// Node.
        node: NodeId,
        /// GPU indices.
        gpus: Vec<u32>,
        /// Checkpoint URI to resume from.
        resume_from: Option<String>,
    },
    /// A live shard must stop: tell its agent (checkpoint signal, grace, SIGTERM, SIGKILL).
    StopRequested {
        /// Job.
        job: JobId,
        /// Shard index.
        shard: u32,
        /// Attempt to stop.
        attempt: AttemptId,
        /// Node it runs on.
        node: NodeId,
        /// Why.
        reason: StopReason,
    },
    /// A shard changed state.
    ShardStateChanged {
        /// Job.
        job: JobId,
        /// Shard index.
        shard: u32,
        /// New state.
        state: ShardState,
    },
    /// A checkpoint was committed.
    CheckpointRecorded {
        /// Job.
        job: JobId,
        /// Shard index.
        shard: u32,
        /// Step.
        step: u64,
    },
    /// A node registered.
    NodeRegistered {
        /// Its id.
        node: NodeId,
        /// True the first time this name registered.
        new: bool,
    },
    /// A node changed state.
    NodeStateChanged {
        /// Which.
        node: NodeId,
        /// New state.
        state: NodeState,
    },
    /// A GPU changed health.
    GpuHealthChanged {
        /// Node.
        node: NodeId,
        /// GPU index.
        gpu: u32,
        /// New health.
        healthy: bool,
    },
    /// A placement of a plan had gone stale and was not applied.
    PlacementRejected {
        /// Job it was for.
        job: JobId,
        /// Why.
        reason: String,
    },
    /// A tenant was created or changed.
    TenantUpdated {
        /// Name.
        name: String,
    },
    /// A token was created or revoked (servers refresh their token index).
    AclChanged {
        /// The token's accessor.
        accessor: String,
    },
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The spec is invalid.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// Some other field is invalid.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such job.
    #[error("no job {0}")]
    UnknownJob(JobId),
    /// No such node.
    #[error("no node {0}")]
    UnknownNode(NodeId),
    /// No such GPU on the node.
    #[error("{node} has no GPU {gpu}")]
    UnknownGpu {
        /// Node.
        node: NodeId,
        /// GPU index.
        gpu: u32,
    },
    /// The attempt is not live: a report from a stale attempt (fencing).
    #[error("{0} is not a live attempt (stale report refused)")]
    StaleAttempt(AttemptId),
    /// The job has already finished.
    #[error("{job} has already finished ({state:?})")]
    JobFinished {
        /// Job.
        job: JobId,
        /// Its final state.
        state: JobState,
    },
    /// The command does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The job asks for a priority above its tenant's `max_priority`.
    #[error("priority: {asked} is above the highest priority tenant {tenant} may use ({cap})")]
    PriorityAboveCap {
        /// Tenant.
        tenant: String,
        /// Its `max_priority`.
        cap: u16,
        /// The priority asked for.
        asked: u16,
    },
    /// A tenant to create exists already ([`TenantWrite::Create`]).
    #[error("tenant {0} already exists")]
    TenantExists(String),
    /// No such tenant ([`TenantWrite::Update`]).
    #[error("no tenant {0}")]
    UnknownTenant(String),
    /// Something it names does not exist (a token).
    #[error("{0}")]
    NotFound(String),
}

/// What applying a command gives: the events, or why it was refused.
pub type ApplyResult = Result<Vec<Event>, Rejection>;

/// Convenience for the many "not a valid spec" paths.
pub(crate) fn spec_rejection(field: &str, message: &str) -> Rejection {
    Rejection::InvalidSpec(crate::spec::invalid_spec(field, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_the_envelope() {
        let cmd = Command::SubmitJob {
            spec: JobSpec::new(vec!["true".into()], 2, 4),
            idempotency_key: None,
            priority_defaulted: false,
            submitted_by: None,
        };
        let bytes = cmd.encode();
        assert_eq!(Command::decode(&bytes).unwrap(), cmd);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("{\"v\":1,\"type\":\"submit_job\""), "{text}");
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        let newer = br#"{"v":99,"type":"undrain_node","node":1}"#;
        assert!(matches!(Command::decode(newer), Err(DecodeError::UnknownVersion(99))));
        assert!(matches!(Command::decode(b"\xff\x00"), Err(DecodeError::Malformed(_))));
        let no_type = br#"{"v":1,"node":1}"#;
        assert!(matches!(Command::decode(no_type), Err(DecodeError::Malformed(_))));
        let ok = br#"{"v":1,"type":"undrain_node","node":7}"#;
        assert_eq!(Command::decode(ok).unwrap(), Command::UndrainNode { node: NodeId(7) });
    }
}
