//! The domain model: jobs, shards, attempts, nodes, GPUs, tenants and checkpoints.
//!
//! These are plain data. Every change to them happens in [`crate::state::State::apply`].

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
    /// Out of placement until an operator clears it.
    Unhealthy {
        /// What was seen, like "XID 79" or "uncorrectable ECC error".
        reason: String,
        /// When it was marked.
        since: Timestamp,
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
}

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
}

impl StopReason {
    /// After stopping for this reason, is the shard placed again?
    pub fn requeues(self) -> bool {
        !matches!(self, StopReason::Cancelled | StopReason::JobFailed)
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

/// A tenant: a team or project whose GPU-hours are counted for fair share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    /// Name.
    pub name: String,
    /// Share weight (1 to 10,000): twice the weight, twice the GPU-hours at equal priority.
    pub weight: u32,
    /// Most GPUs the tenant may hold at once, across all clouds; None: no quota.
    pub gpu_quota: Option<u64>,
    /// Decayed GPU-hours used, as of `usage_at`.
    pub usage_gpu_hours: f64,
    /// When `usage_gpu_hours` was last brought up to date.
    pub usage_at: Timestamp,
    /// GPUs held right now by the tenant's live shards (derived; rebuilt on restore).
    #[serde(skip)]
    pub gpus_in_use: u64,
}

impl Tenant {
    /// A tenant with weight 1 and no quota.
    pub fn new(name: &str, now: Timestamp) -> Tenant {
        Tenant { name: name.into(), weight: 1, gpu_quota: None, usage_gpu_hours: 0.0, usage_at: now, gpus_in_use: 0 }
    }

    /// Decayed usage at `now`, counting the GPUs held since `usage_at`.
    pub fn usage_at(&self, now: Timestamp, half_life_ms: u64) -> f64 {
        let dt = now.since(self.usage_at);
        if dt == 0 {
            return self.usage_gpu_hours;
        }
        let decay = if half_life_ms == 0 { 0.0 } else { 0.5f64.powf(dt as f64 / half_life_ms as f64) };
        self.usage_gpu_hours * decay + self.gpus_in_use as f64 * dt as f64 / 3_600_000.0
    }

    /// Bring the usage up to `now`; call before `gpus_in_use` changes.
    pub fn accrue(&mut self, now: Timestamp, half_life_ms: u64) {
        if now > self.usage_at {
            self.usage_gpu_hours = self.usage_at(now, half_life_ms);
            self.usage_at = now;
        }
    }
}
