//! The domain model: jobs, shards, attempts, nodes, GPUs, tenants and checkpoints.
//!
//! These are plain data. Every change to them happens in [`crate::state::State::apply`].
//! Fields added after the first release are `#[serde(default)]`, so older snapshots decode.
//! A [`Tenant`] carries its limits (GPU quota, priority cap and default, GPU-hours quotas over
//! a rolling window, per cloud or overall) and its usage: decayed GPU-hours for fair share, and
//! per cloud the decayed GPU-hours and the window's buckets. Its GPUs in use, in total and per
//! cloud, are derived counters, rebuilt on restore.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::{Cloud, JobSpec};

/// Milliseconds since the Unix epoch, as stamped by the leader on each command. The core never
/// reads a clock: time comes in with the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The latest representable time; used for "never" and "unknown end".
    pub const NEVER: Timestamp = Timestamp(u64::MAX);

    /// This time plus `ms` milliseconds, saturating.
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
    /// This time plus `s` seconds, saturating.
    pub fn plus_secs(self, s: u64) -> Timestamp {
        self.plus_ms(s.saturating_mul(1000))
    }
    /// Milliseconds from `earlier` to this time, 0 if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A job, numbered from 1 in submission order by the state machine.
    JobId, "job-"
);
id_type!(
    /// A node, numbered from 1 when its agent first registers; stable across reconnects.
    NodeId, "node-"
);
id_type!(
    /// One placement of one shard. Reports carrying an older attempt id are refused (fencing).
    AttemptId, "attempt-"
);

/// Why a GPU is out of placement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GpuHealth {
    /// Usable.
    Healthy,
    /// Out of placement.
    Unhealthy {
        /// What was seen, like "XID 79" or "uncorrectable ECC error".
        reason: String,
        /// When it was marked.
        since: Timestamp,
        /// When it goes back into placement by itself (a hardware fault's cool-down, see
        /// [`crate::xid`]); None: only when an operator clears it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Timestamp>,
    },
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Gpu {
    /// Index on the node (NVML index), the value put in `CUDA_VISIBLE_DEVICES`.
    pub index: u32,
    /// NVML UUID, like `GPU-5fd4...`.
    pub uuid: String,
    /// Model name as NVML reports it, like "NVIDIA H100 80GB HBM3".
    pub model: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// Health; unhealthy GPUs take no new shards.
    pub health: GpuHealth,
    /// The live attempt holding this GPU, if any.
    pub holder: Option<AttemptId>,
    /// When its hardware faults within [`crate::xid::FAULT_WINDOW_MS`] happened, oldest first
    /// (forgotten when an operator clears the GPU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<Timestamp>,
}

impl Gpu {
    /// True when the GPU is healthy.
    pub fn healthy(&self) -> bool {
        matches!(self.health, GpuHealth::Healthy)
    }
}

/// What an agent says about its host when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Host name, unique in the fleet; re-registering with the same name is the same node.
    pub name: String,
    /// Cloud the host runs in.
    pub cloud: Cloud,
    /// Region, like "us-east-1" or "eastus".
    pub region: String,
    /// Availability zone, like "us-east-1a" or "eastus-2".
    pub zone: String,
    /// Instance type, like "p5.48xlarge" or "Standard_ND96isr_H100_v5".
    pub instance_type: String,
    /// Spot (preemptible) capacity.
    pub spot: bool,
    /// Price per GPU-hour in micro-dollars (1/1,000,000 USD).
    pub price_micros_per_gpu_hour: u64,
    /// Allocatable CPU in millicores.
    pub cpu_millis: u64,
    /// Allocatable memory in MiB.
    pub memory_mib: u64,
    /// The GPUs: (uuid, model, memory MiB), in NVML index order.
    pub gpus: Vec<GpuInfo>,
    /// Free-form labels placement constraints match on.
    pub labels: BTreeMap<String, String>,
    /// Agent version string.
    pub agent_version: String,
    /// True when the GPUs are simulated (no NVIDIA driver): never mistaken for real hardware.
    pub simulated: bool,
    /// The ports (inclusive) its agent lets gangs whose rank 0 runs here use for their
    /// rendezvous (`MASTER_PORT`); None: [`DEFAULT_RENDEZVOUS_PORTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous_ports: Option<(u16, u16)>,
}

/// Rendezvous ports of a node that names none: torchrun's default, 29500, and the next 999 (all
/// below Linux's ephemeral range, 32768 and up).
pub const DEFAULT_RENDEZVOUS_PORTS: (u16, u16) = (29_500, 30_499);

/// A GPU as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML UUID.
    pub uuid: String,
    /// Model name.
    pub model: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
}

/// Why a node takes no new shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DrainReason {
    /// An operator drained it.
    Operator,
    /// The cloud announced that it will reclaim the (spot) instance.
    SpotInterruption,
}

/// Lifecycle of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Takes shards.
    Ready,
    /// Takes no new shards; its shards checkpoint and move (or finish before the deadline).
    Draining {
        /// Why.
        reason: DrainReason,
        /// When the node goes away, if known.
        deadline: Option<Timestamp>,
    },
    /// Its agent is gone; it holds nothing.
    Down {
        /// When it was marked down.
        since: Timestamp,
    },
}

/// A GPU host with an agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    /// Stable id.
    pub id: NodeId,
    /// What the agent reported at its last registration (its `gpus` field mirrors `gpus`).
    pub info: NodeInfo,
    /// GPUs with health and holder.
    pub gpus: Vec<Gpu>,
    /// Lifecycle state.
    pub state: NodeState,
    /// CPU held by live attempts, in millicores.
    pub cpu_used: u64,
    /// Memory held by live attempts, in MiB.
    pub memory_used: u64,
    /// When the node first registered.
    pub registered_at: Timestamp,
    /// Log index of its latest registration: a "node down" judged before it is stale.
    #[serde(default)]
    pub registration: u64,
}

impl Node {
    /// True when the node takes new shards.
    pub fn schedulable(&self) -> bool {
        matches!(self.state, NodeState::Ready)
    }
}

/// The latest durable checkpoint reported by a shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Training step the checkpoint holds.
    pub step: u64,
    /// Where it is (path or URI); handed to the next attempt as `TESSERA_RESUME_FROM`.
    pub uri: String,
    /// When it was committed.
    pub at: Timestamp,
}

/// Why a live shard is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StopReason {
    /// The job was cancelled: the shard ends cancelled.
    Cancelled,
    /// A higher-priority job needs the GPUs: requeued.
    Preempted {
        /// The job it makes room for.
        by: JobId,
    },
    /// Its node is draining: requeued.
    Drain,
    /// Its node received a spot interruption notice: requeued.
    SpotInterruption,
    /// One of its GPUs went unhealthy: requeued.
    GpuFault,
    /// Another rank of its gang failed or was lost; the gang restarts from its checkpoint.
    GangRestart,
    /// The job failed for good: the shard ends cancelled.
    JobFailed,
    /// The attempt ran past the job's `max_runtime`: the shard ends failed, and so does the job.
    TimeLimit,
    /// The shard reported no new step within the job's `progress_timeout` (a hang): the gang
    /// restarts from its checkpoint, as a restart, not a failure.
    Stalled,
    /// The job hung [`MAX_STALLS`] times in a row without a new checkpoint: the shard ends
    /// failed, and so does the job.
    Hung,
}

impl StopReason {
    /// After stopping for this reason, is the shard placed again?
    pub fn requeues(self) -> bool {
        !matches!(self, StopReason::Cancelled | StopReason::JobFailed | StopReason::TimeLimit | StopReason::Hung)
    }
    /// How a shard stopped for this reason ends, when it is not placed again.
    pub fn ends_as(self) -> ShardState {
        if matches!(self, StopReason::TimeLimit | StopReason::Hung) {
            ShardState::Failed
        } else {
            ShardState::Cancelled
        }
    }
}

/// Lifecycle of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShardState {
    /// Waiting to be placed.
    Pending,
    /// Placed; the agent has not confirmed the start yet.
    Assigned,
    /// The agent confirmed the process runs.
    Running,
    /// Asked to stop; still holds its GPUs until the agent reports the exit.
    Stopping(StopReason),
    /// Exited 0.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl ShardState {
    /// Holds GPUs (assigned, running or stopping).
    pub fn is_live(self) -> bool {
        matches!(self, ShardState::Assigned | ShardState::Running | ShardState::Stopping(_))
    }
    /// Will never run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, ShardState::Succeeded | ShardState::Failed | ShardState::Cancelled)
    }
}

/// One placement of a shard on a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attempt {
    /// Globally unique, increasing id.
    pub id: AttemptId,
    /// 1 for the shard's first attempt, then 2, 3, ... (`TESSERA_ATTEMPT`).
    pub number: u32,
    /// Node it runs on.
    pub node: NodeId,
    /// GPU indices on that node.
    pub gpus: Vec<u32>,
    /// When it was placed.
    pub assigned_at: Timestamp,
    /// When the agent confirmed it started.
    pub started_at: Option<Timestamp>,
    /// Shard 0's attempt: the rendezvous port (`MASTER_PORT`) of its gang on its node, one no
    /// other live gang there uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// One shard of a job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    /// Index = rank of the node in the job.
    pub index: u32,
    /// Lifecycle state.
    pub state: ShardState,
    /// The current attempt while live; the last one after it ended.
    pub attempt: Option<Attempt>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Times it was placed again after losing its node, preemption, drain or a gang restart.
    pub restarts: u32,
    /// Its latest checkpoint.
    pub checkpoint: Option<Checkpoint>,
    /// Not placed before this time (retry backoff).
    pub not_before: Timestamp,
}

impl Shard {
    /// Shard `index` of a new job (or a new array element): pending from `now`, never placed.
    pub fn new_pending(index: u32, now: Timestamp) -> Shard {
        Shard {
            index,
            state: ShardState::Pending,
            attempt: None,
            attempts: 0,
            restarts: 0,
            checkpoint: None,
            not_before: now,
        }
    }
}

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Nothing running yet (or everything requeued).
    Pending,
    /// At least one shard holds GPUs.
    Running,
    /// Every shard exited 0.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl JobState {
    /// Finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
    /// The state in words, as listings print it: "pending", "running", "succeeded"...
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Job {
    /// Id.
    pub id: JobId,
    /// What was asked for.
    pub spec: JobSpec,
    /// Lifecycle state.
    pub state: JobState,
    /// Shards, by index.
    pub shards: Vec<Shard>,
    /// When it was accepted.
    pub submitted_at: Timestamp,
    /// When its first shard was placed.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// Failures of its own code counted against `retry.max_attempts`.
    pub failures: u32,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// Why it failed or was cancelled, for people.
    pub message: Option<String>,
    /// The identity that submitted it, as the server authenticated it (like "user/alice" or
    /// "token/ci"); None for jobs submitted before this was recorded, or without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    /// What happened to it, oldest first (see [`crate::timeline`]): placements, starts, exits,
    /// checkpoints, stops and requeues. Its submission and its end are not stored here: the
    /// job's own fields say them. At most [`crate::timeline::MAX_EVENTS`].
    #[serde(default, rename = "ev", skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<JobEvent>,
    /// A job array's own record (its spec has `array`; it has no shards): how far its elements
    /// have got. See [`crate::arrays`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayProgress>,
    /// An element of a job array: which array, and its index (`TESSERA_ARRAY_INDEX`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element_of: Option<ArrayElement>,
    /// Its `after_ok`/`after_any` dependencies that have not ended yet: it is not placed (nor,
    /// for an array, are its elements created) while any remains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_on: Vec<JobId>,
    /// Hangs in a row (stops for its `progress_timeout`) with no new checkpoint between them;
    /// the job fails at [`MAX_STALLS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stalls: u32,
}

/// Hangs in a row without a new checkpoint after which a job fails: restarting it again would
/// only hang again from the same place. The ones before are restarts, not failures.
pub const MAX_STALLS: u32 = 3;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Job {
    /// True for a job array's own record (which has no shards of its own).
    pub fn is_array(&self) -> bool {
        self.spec.array.is_some()
    }
}

/// Where a job array's elements are. Every element is a job of its own, created in index order
/// as the array's limit allows; `next` counts those created (and, after a cancel, those that
/// never will be).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArrayProgress {
    /// Elements created so far (position in the index list of the next one).
    pub next: u64,
    /// Created and not finished.
    pub active: u32,
    /// Created and pending (waiting for placement).
    pub queued: u32,
    /// Elements that succeeded.
    pub succeeded: u64,
    /// Elements that failed.
    pub failed: u64,
    /// Elements cancelled, including those never created because the array was cancelled.
    pub cancelled: u64,
}

/// An array element's place in its array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArrayElement {
    /// The array's own job.
    pub array: JobId,
    /// Its index (`TESSERA_ARRAY_INDEX`).
    pub index: u32,
}

/// One thing that happened to a job's shard, as stored in [`Job::events`]. Kept small (a job
/// that runs once without trouble stores three per shard), with short names in snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobEvent {
    /// Its number among the job's events ever recorded, from 0; a gap shows where events were
    /// dropped to keep the list bounded.
    #[serde(rename = "q")]
    pub seq: u64,
    /// When the command that caused it was applied.
    #[serde(rename = "t")]
    pub at: Timestamp,
    /// What happened.
    #[serde(rename = "k")]
    pub kind: JobEventKind,
    /// Shard concerned.
    #[serde(rename = "s")]
    pub shard: u32,
    /// Attempt concerned, if any.
    #[serde(default, rename = "a", skip_serializing_if = "Option::is_none")]
    pub attempt: Option<AttemptId>,
    /// Node concerned, if any.
    #[serde(default, rename = "n", skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
    /// More words for people (a GPU's fault, a lost node's reason, a process's last words),
    /// at most [`crate::timeline::MAX_DETAIL`] bytes.
    #[serde(default, rename = "d", skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What a [`JobEvent`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobEventKind {
    /// A new attempt was placed on a node (attempt 1, or a restart after a requeue).
    Placed {
        /// The shard's attempt number.
        number: u32,
    },
    /// The agent started the attempt's process.
    Started,
    /// The attempt's process ended.
    Exited {
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal, when one killed it.
        signal: Option<i32>,
    },
    /// The attempt committed a checkpoint.
    Checkpoint {
        /// Training step it holds.
        step: u64,
    },
    /// The servers asked the attempt's agent to stop it.
    Stopping {
        /// Why.
        reason: StopReason,
    },
    /// The attempt's node was lost (down, or back with other GPUs) with the attempt on it.
    NodeLost,
    /// The shard went back to pending, to be placed again.
    Requeued {
        /// Why.
        why: Requeue,
        /// Not placed before this time (a retry's backoff); None: at once.
        not_before: Option<Timestamp>,
    },
}

/// Why a shard was requeued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requeue {
    /// It was stopped for this reason (preemption, drain, spot notice, GPU fault, gang restart).
    Stopped(StopReason),
    /// Its node was lost.
    NodeLost,
    /// Its process failed because of its node or a GPU: no retry budget used.
    NodeFault,
    /// Its process failed and the job's retry policy allows another attempt.
    Retry,
}

impl Job {
    /// Checkpoint a re-placed shard resumes from: its own, else the newest of the job.
    pub fn resume_point(&self, shard: u32) -> Option<&Checkpoint> {
        self.shards
            .get(shard as usize)
            .and_then(|s| s.checkpoint.as_ref())
            .or_else(|| self.shards.iter().filter_map(|s| s.checkpoint.as_ref()).max_by_key(|c| (c.step, c.at)))
    }
    /// GPUs held by live shards.
    pub fn live_gpus(&self) -> u64 {
        self.shards.iter().filter(|s| s.state.is_live()).count() as u64 * u64::from(self.spec.resources.gpus)
    }
}

/// Default length of a tenant's GPU-hours quota window: 7 days.
pub const DEFAULT_GPU_HOURS_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;
/// Shortest GPU-hours window: one minute.
pub const MIN_GPU_HOURS_WINDOW_MS: u64 = 60_000;
/// Longest GPU-hours window: 366 days.
pub const MAX_GPU_HOURS_WINDOW_MS: u64 = 366 * 24 * 3600 * 1000;
/// A window is kept as this many buckets (see [`Tenant::gpu_hours_bucket_ms`]).
pub const GPU_HOURS_BUCKETS: u64 = 24;
/// Shortest bucket of a GPU-hours window: one minute.
pub const MIN_GPU_HOURS_BUCKET_MS: u64 = 60_000;

const MS_PER_HOUR: f64 = 3_600_000.0;

fn default_window_ms() -> u64 {
    DEFAULT_GPU_HOURS_WINDOW_MS
}

/// What a tenant has used on one cloud (stored in the snapshot).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CloudAccount {
    /// Decayed GPU-hours used on this cloud, as of the tenant's `usage_at` (for display; fair
    /// share uses the tenant's total, [`Tenant::usage_gpu_hours`]).
    #[serde(default)]
    pub usage_gpu_hours: f64,
    /// GPU-milliseconds used, per bucket of the GPU-hours window, keyed by the bucket's start.
    /// Buckets that have left the window are pruned whenever the tenant accrues.
    #[serde(default)]
    pub window_gpu_ms: BTreeMap<Timestamp, u64>,
}

/// A tenant's usage of one cloud, for display ([`Tenant::usage_by_cloud`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CloudUsage {
    /// Decayed GPU-hours (the fair-share measure, restricted to this cloud).
    pub decayed_gpu_hours: f64,
    /// GPU-hours counted in the current GPU-hours quota window.
    pub window_gpu_hours: f64,
    /// GPUs held on this cloud right now.
    pub gpus_in_use: u64,
}

/// A tenant: a team or project whose GPU-hours are counted for fair share, with the limits an
/// operator sets on it.
///
/// GPU-hours quotas count usage over a rolling window of `gpu_hours_window_ms`. The window is
/// kept per cloud as [`GPU_HOURS_BUCKETS`] buckets of `window / 24` (at least one minute,
/// [`Tenant::gpu_hours_bucket_ms`]); usage is added to the buckets it falls in whenever the
/// tenant's GPUs in use change, and the GPUs held since then are counted on the fly. The
/// approximation: the oldest bucket counts whole while any part of it is still inside the
/// window, so usage is forgotten in bucket steps, between one window and one window plus one
/// bucket after it happened. The window total is therefore never below the true rolling total
/// and above it by at most one bucket's usage. When the window length changes, each bucket is
/// moved to the new bucket holding its last used millisecond (again never forgetting early).
/// Usage from before a release that kept per-cloud accounts is not in any window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    /// Name.
    pub name: String,
    /// Share weight (1 to 10,000): twice the weight, twice the GPU-hours at equal priority.
    pub weight: u32,
    /// Most GPUs the tenant may hold at once, across all clouds; None: no quota.
    pub gpu_quota: Option<u64>,
    /// Highest priority its jobs may ask for; a submission above it is refused
    /// ([`crate::Rejection::PriorityAboveCap`]). None: any.
    #[serde(default)]
    pub max_priority: Option<u16>,
    /// Priority of its jobs whose submission gave none. None: the spec's default.
    #[serde(default)]
    pub default_priority: Option<u16>,
    /// GPU-hours the tenant may use per window, across all clouds; at or over it, none of its
    /// jobs is placed (running ones go on). None: no quota.
    #[serde(default)]
    pub gpu_hours_quota: Option<f64>,
    /// GPU-hours the tenant may use per window on one cloud (key: "aws", "azure", "none"); at or
    /// over it, none of its jobs is placed on that cloud's nodes.
    #[serde(default)]
    pub cloud_gpu_hours_quota: BTreeMap<String, f64>,
    /// Length of the rolling GPU-hours window, in milliseconds (1 minute to 366 days).
    #[serde(default = "default_window_ms")]
    pub gpu_hours_window_ms: u64,
    /// Decayed GPU-hours used, as of `usage_at`.
    pub usage_gpu_hours: f64,
    /// When `usage_gpu_hours` (and each cloud's account) was last brought up to date.
    pub usage_at: Timestamp,
    /// Per-cloud decayed usage and GPU-hours window buckets, as of `usage_at`.
    #[serde(default)]
    pub clouds: BTreeMap<Cloud, CloudAccount>,
    /// GPUs held right now by the tenant's live shards (derived; rebuilt on restore).
    #[serde(skip)]
    pub gpus_in_use: u64,
    /// GPUs held right now per cloud of their node, without zero entries (derived; rebuilt on
    /// restore). Sums to `gpus_in_use`.
    #[serde(skip)]
    pub cloud_gpus_in_use: BTreeMap<Cloud, u64>,
}

impl Tenant {
    /// A tenant with weight 1 and no quota or priority limits.
    pub fn new(name: &str, now: Timestamp) -> Tenant {
        Tenant {
            name: name.into(),
            weight: 1,
            gpu_quota: None,
            max_priority: None,
            default_priority: None,
            gpu_hours_quota: None,
            cloud_gpu_hours_quota: BTreeMap::new(),
            gpu_hours_window_ms: DEFAULT_GPU_HOURS_WINDOW_MS,
            usage_gpu_hours: 0.0,
            usage_at: now,
            clouds: BTreeMap::new(),
            gpus_in_use: 0,
            cloud_gpus_in_use: BTreeMap::new(),
        }
    }

    fn decay(&self, now: Timestamp, half_life_ms: u64) -> f64 {
        let dt = now.since(self.usage_at);
        if half_life_ms == 0 { 0.0 } else { 0.5f64.powf(dt as f64 / half_life_ms as f64) }
    }

    /// Decayed usage at `now`, counting the GPUs held since `usage_at`.
    pub fn usage_at(&self, now: Timestamp, half_life_ms: u64) -> f64 {
        let dt = now.since(self.usage_at);
        if dt == 0 {
            return self.usage_gpu_hours;
        }
        self.usage_gpu_hours * self.decay(now, half_life_ms) + self.gpus_in_use as f64 * dt as f64 / MS_PER_HOUR
    }

    /// Bring the usage (total, per cloud, and the window buckets) up to `now`; call before the
    /// GPUs in use change. Buckets that have left the window are pruned.
    pub fn accrue(&mut self, now: Timestamp, half_life_ms: u64) {
        if now <= self.usage_at {
            return;
        }
        let dt = now.since(self.usage_at);
        let decay = self.decay(now, half_life_ms);
        self.usage_gpu_hours = self.usage_gpu_hours * decay + self.gpus_in_use as f64 * dt as f64 / MS_PER_HOUR;
        let width = self.gpu_hours_bucket_ms();
        let from = self.window_from(now);
        let start = self.usage_at.max(from);
        for account in self.clouds.values_mut() {
            account.usage_gpu_hours *= decay;
        }
        for (cloud, gpus) in &self.cloud_gpus_in_use {
            let account = self.clouds.entry(*cloud).or_default();
            account.usage_gpu_hours += *gpus as f64 * dt as f64 / MS_PER_HOUR;
            // At most a window's worth of buckets: what lies before `from` would be pruned.
            let mut t = start.0;
            while t < now.0 {
                let bucket = t - t % width;
                let end = bucket.saturating_add(width).min(now.0);
                let slot = account.window_gpu_ms.entry(Timestamp(bucket)).or_default();
                *slot = slot.saturating_add(gpus.saturating_mul(end - t));
                t = end;
            }
        }
        for account in self.clouds.values_mut() {
            account.window_gpu_ms = account.window_gpu_ms.split_off(&from);
        }
        self.usage_at = now;
    }

    /// Count `gpus` more GPUs held on `cloud`, accruing usage up to `now` first.
    pub fn take_gpus(&mut self, cloud: Cloud, gpus: u64, now: Timestamp, half_life_ms: u64) {
        self.accrue(now, half_life_ms);
        self.count_gpus(cloud, gpus);
    }

    /// Count `gpus` fewer GPUs held on `cloud`, accruing usage up to `now` first.
    pub fn release_gpus(&mut self, cloud: Cloud, gpus: u64, now: Timestamp, half_life_ms: u64) {
        self.accrue(now, half_life_ms);
        self.gpus_in_use = self.gpus_in_use.saturating_sub(gpus);
        if let Some(held) = self.cloud_gpus_in_use.get_mut(&cloud) {
            *held = held.saturating_sub(gpus);
            if *held == 0 {
                self.cloud_gpus_in_use.remove(&cloud);
            }
        }
    }

    /// Add to the GPU counters without accruing (rebuilding the derived counters).
    pub(crate) fn count_gpus(&mut self, cloud: Cloud, gpus: u64) {
        if gpus == 0 {
            return;
        }
        self.gpus_in_use += gpus;
        *self.cloud_gpus_in_use.entry(cloud).or_default() += gpus;
    }

    /// Width of one bucket of the GPU-hours window: a 24th of the window, at least one minute.
    pub fn gpu_hours_bucket_ms(&self) -> u64 {
        (self.gpu_hours_window_ms / GPU_HOURS_BUCKETS).max(MIN_GPU_HOURS_BUCKET_MS)
    }

    /// Start of the oldest bucket still counted at `now`: the one holding `now - window`.
    fn window_from(&self, now: Timestamp) -> Timestamp {
        let width = self.gpu_hours_bucket_ms();
        let edge = now.0.saturating_sub(self.gpu_hours_window_ms);
        Timestamp(edge - edge % width)
    }

    /// GPU-milliseconds in the window at `now` on one cloud, counting the GPUs held since
    /// `usage_at`.
    fn window_gpu_ms(&self, cloud: Cloud, now: Timestamp) -> u64 {
        let from = self.window_from(now);
        let stored = self
            .clouds
            .get(&cloud)
            .map_or(0, |a| a.window_gpu_ms.range(from..).fold(0u64, |sum, (_, ms)| sum.saturating_add(*ms)));
        let held = self.cloud_gpus_in_use.get(&cloud).copied().unwrap_or(0);
        stored.saturating_add(held.saturating_mul(now.since(self.usage_at.max(from))))
    }

    /// The clouds the tenant has used in the window or holds GPUs on.
    fn used_clouds(&self) -> impl Iterator<Item = Cloud> + '_ {
        let mut clouds: Vec<Cloud> = self.clouds.keys().chain(self.cloud_gpus_in_use.keys()).copied().collect();
        clouds.sort();
        clouds.dedup();
        clouds.into_iter()
    }

    /// GPU-hours used in the current window at `now`, all clouds together (see the type's doc
    /// for the bucket approximation).
    pub fn window_gpu_hours(&self, now: Timestamp) -> f64 {
        let ms = self.used_clouds().fold(0u64, |sum, c| sum.saturating_add(self.window_gpu_ms(c, now)));
        ms as f64 / MS_PER_HOUR
    }

    /// GPU-hours used in the current window at `now` on one cloud.
    pub fn cloud_window_gpu_hours(&self, cloud: Cloud, now: Timestamp) -> f64 {
        self.window_gpu_ms(cloud, now) as f64 / MS_PER_HOUR
    }

    /// True when the all-clouds GPU-hours quota is used up at `now`: none of the tenant's jobs
    /// may be placed.
    pub fn gpu_hours_exhausted(&self, now: Timestamp) -> bool {
        self.gpu_hours_quota.is_some_and(|q| self.window_gpu_hours(now) >= q)
    }

    /// True when the tenant's jobs may not be placed on `cloud` at `now`: the all-clouds quota
    /// or that cloud's quota is used up.
    pub fn gpu_hours_exhausted_on(&self, cloud: Cloud, now: Timestamp) -> bool {
        self.gpu_hours_exhausted(now)
            || self
                .cloud_gpu_hours_quota
                .get(cloud.as_str())
                .is_some_and(|q| self.cloud_window_gpu_hours(cloud, now) >= *q)
    }

    /// The clouds whose own quota is used up at `now` (the all-clouds quota aside).
    pub fn gpu_hours_exhausted_clouds(&self, now: Timestamp) -> Vec<Cloud> {
        self.cloud_gpu_hours_quota
            .iter()
            .filter_map(|(name, q)| {
                let cloud = name.parse::<Cloud>().ok()?;
                (self.cloud_window_gpu_hours(cloud, now) >= *q).then_some(cloud)
            })
            .collect()
    }

    /// Usage per cloud at `now`, for display: decayed GPU-hours (the fair-share measure; the
    /// planner itself uses the total, [`Tenant::usage_at`]), GPU-hours in the quota window, and
    /// GPUs held.
    pub fn usage_by_cloud(&self, now: Timestamp, half_life_ms: u64) -> BTreeMap<Cloud, CloudUsage> {
        let dt = now.since(self.usage_at);
        let decay = if dt == 0 { 1.0 } else { self.decay(now, half_life_ms) };
        self.used_clouds()
            .map(|c| {
                let gpus = self.cloud_gpus_in_use.get(&c).copied().unwrap_or(0);
                let stored = self.clouds.get(&c).map_or(0.0, |a| a.usage_gpu_hours);
                let usage = CloudUsage {
                    decayed_gpu_hours: stored * decay + gpus as f64 * dt as f64 / MS_PER_HOUR,
                    window_gpu_hours: self.cloud_window_gpu_hours(c, now),
                    gpus_in_use: gpus,
                };
                (c, usage)
            })
            .collect()
    }

    /// Change the window length, moving each bucket to the new bucket that holds its last used
    /// millisecond, and prune what has left the new window. Accrue first.
    pub fn set_gpu_hours_window(&mut self, window_ms: u64) {
        let old_width = self.gpu_hours_bucket_ms();
        self.gpu_hours_window_ms = window_ms;
        let width = self.gpu_hours_bucket_ms();
        if width != old_width {
            let used_until = self.usage_at;
            for account in self.clouds.values_mut() {
                let mut moved: BTreeMap<Timestamp, u64> = BTreeMap::new();
                for (start, ms) in std::mem::take(&mut account.window_gpu_ms) {
                    // Usage in the old bucket ended by its end and by `usage_at`.
                    let end = start.0.saturating_add(old_width).min(used_until.0.max(start.0.saturating_add(1)));
                    let last = end.saturating_sub(1);
                    let slot = moved.entry(Timestamp(last - last % width)).or_default();
                    *slot = slot.saturating_add(ms);
                }
                account.window_gpu_ms = moved;
            }
        }
        let from = self.window_from(self.usage_at);
        for account in self.clouds.values_mut() {
            account.window_gpu_ms = account.window_gpu_ms.split_off(&from);
        }
    }
}
