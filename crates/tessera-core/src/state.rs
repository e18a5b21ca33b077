//! The replicated state machine: [`State::apply`] takes a [`Command`] and its stamped time and
//! returns events or a rejection. Every server applies the same log to the same result.
//!
//! Rules kept here (checked after every apply in debug builds, and on every restore):
//! - a GPU is held by at most one live attempt, and a live attempt holds exactly its GPUs;
//! - a job never has a pending shard beside a live one unless some shard is stopping
//!   (gangs are placed whole);
//! - down nodes hold nothing; terminal jobs hold nothing;
//! - derived counters (CPU, memory, tenant GPUs in total and per cloud) equal what the
//!   attempts say;
//! - tenant settings are in range (priorities, GPU-hours quotas and window) and the window
//!   buckets are aligned to the window's bucket width.
//!
//! Tenants: a submission is checked against its tenant's `max_priority` (after its
//! `default_priority` replaces a priority the user did not give), and records who submitted
//! it. The tenant's usage is accrued (decayed total, per cloud, and the GPU-hours window)
//! whenever its GPUs in use change. A placement of a tenant at its GPU quota or its GPU-hours
//! quota (overall, or on the cloud of a node of the placement), or a preemption for a tenant at
//! its overall GPU-hours quota, is refused on apply as stale.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::command::{ApplyContext, ApplyResult, Command, Event, ExitStatus, Rejection, TenantWrite, spec_rejection};
use crate::model::{
    Attempt, AttemptId, Checkpoint, DrainReason, Gpu, GpuHealth, Job, JobEvent, JobEventKind, JobId, JobState,
    MAX_GPU_HOURS_WINDOW_MS, MIN_GPU_HOURS_WINDOW_MS, Node, NodeId, NodeInfo, NodeState, Requeue, Shard, ShardState,
    StopReason, Tenant, Timestamp,
};
use crate::placement::{GangPlacement, Plan, Preemption, node_admits, span_ok};
use crate::spec::{Cloud, limits};

mod arrays;
pub use arrays::ARRAY_WINDOW;

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Longest `submitted_by` identity accepted, in bytes.
pub const MAX_SUBMITTED_BY: usize = 256;

/// JSON maps need string keys: store a map with tuple keys as a list of pairs.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(m: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Highest price a node may report, micro-dollars per GPU-hour ($10,000): the planner adds up
/// price times GPUs over a whole gang, which must not overflow.
pub const MAX_PRICE_MICROS_PER_GPU_HOUR: u64 = 10_000_000_000;

/// Snapshot encoding this build writes.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Default fair-share half-life: 7 days, as Slurm's PriorityDecayHalfLife.
pub const DEFAULT_HALF_LIFE_MS: u64 = 7 * 24 * 3600 * 1000;

/// Scheduler settings that are part of the replicated state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Half-life of tenants' GPU-hour usage, in milliseconds.
    pub fair_share_half_life_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { fair_share_half_life_ms: DEFAULT_HALF_LIFE_MS }
    }
}

/// Where a live attempt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptRef {
    /// Job.
    pub job: JobId,
    /// Shard index.
    pub shard: u32,
}

/// A GPU health report, as [`Command::SetGpuHealth`] carries it.
struct GpuReport {
    healthy: bool,
    reason: String,
    xid: Option<u32>,
    cool_down: bool,
}

/// The whole cluster state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    applied_index: u64,
    next_job: u64,
    next_node: u64,
    next_attempt: u64,
    /// Behind `Arc`s so that [`State::snapshot_copy`] shares them instead of copying each:
    /// a write after the copy clones only the one job or node it changes.
    jobs: BTreeMap<JobId, Arc<Job>>,
    nodes: BTreeMap<NodeId, Arc<Node>>,
    tenants: BTreeMap<String, Tenant>,
    config: SchedulerConfig,
    /// Tokens and the bootstrap flag.
    #[serde(default)]
    acl: crate::acl::Acl,
    /// (tenant, idempotency key) of submissions that carried one, and the job they created.
    #[serde(with = "pairs")]
    idempotency: BTreeMap<(String, String), JobId>,
    // Derived indexes, rebuilt on restore.
    #[serde(skip)]
    node_names: BTreeMap<String, NodeId>,
    #[serde(skip)]
    live: BTreeMap<AttemptId, AttemptRef>,
    /// The live attempts of each node (what a reconnecting agent is reconciled against).
    #[serde(skip)]
    live_on: BTreeMap<NodeId, BTreeSet<AttemptId>>,
    #[serde(skip)]
    pending: BTreeSet<JobId>,
    /// The unfinished elements of each job array.
    #[serde(skip)]
    array_live: BTreeMap<JobId, BTreeSet<JobId>>,
    /// The unfinished jobs waiting on each job (their `waiting_on` lists it).
    #[serde(skip)]
    dependents: BTreeMap<JobId, BTreeSet<JobId>>,
    /// Work for the end of the command being applied (see [`State::settle`]): arrays whose
    /// elements moved, and jobs that ended.
    #[serde(skip)]
    touched_arrays: BTreeSet<JobId>,
    #[serde(skip)]
    ended: Vec<JobId>,
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

/// A snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Written by a newer release.
    #[error("snapshot version {0} is newer than this build understands ({SNAPSHOT_VERSION})")]
    UnknownVersion(u32),
    /// Not a snapshot.
    #[error("malformed snapshot: {0}")]
    Malformed(String),
    /// It decodes but breaks an invariant: refuse it rather than serve a corrupt state.
    #[error("snapshot breaks an invariant: {0}")]
    Inconsistent(String),
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    v: u32,
    state: &'a State,
}

#[derive(Deserialize)]
struct SnapshotIn {
    v: u32,
    state: State,
}

/// Only the version, when the whole snapshot does not parse.
#[derive(Deserialize)]
struct SnapshotVersion {
    v: u32,
}

fn reject_if(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Rejection> {
    if cond { Err(Rejection::FailedPrecondition(msg())) } else { Ok(()) }
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn bounded(field: &'static str, s: &str, max: usize) -> Result<(), Rejection> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(Rejection::InvalidArgument {
            field,
            message: format!("must be at most {max} bytes, no control characters"),
        });
    }
    Ok(())
}

/// A tenant's settings are in range, and its window buckets aligned (a hand-made snapshot may
/// say otherwise).
fn check_tenant_settings(t: &Tenant) -> Result<(), String> {
    let name = &t.name;
    if t.max_priority.is_some_and(|p| p > limits::MAX_PRIORITY)
        || t.default_priority.is_some_and(|p| p > limits::MAX_PRIORITY || t.max_priority.is_some_and(|m| p > m))
    {
        return Err(format!("tenant {name} has priority limits out of range"));
    }
    let bad = |q: f64| !(q.is_finite() && q > 0.0);
    if t.gpu_hours_quota.is_some_and(bad)
        || t.cloud_gpu_hours_quota.iter().any(|(c, q)| bad(*q) || c.parse::<Cloud>().map(Cloud::as_str) != Ok(c))
    {
        return Err(format!("tenant {name} has an invalid GPU-hours quota"));
    }
    if !(MIN_GPU_HOURS_WINDOW_MS..=MAX_GPU_HOURS_WINDOW_MS).contains(&t.gpu_hours_window_ms) {
        return Err(format!("tenant {name} has a GPU-hours window out of range"));
    }
    let width = t.gpu_hours_bucket_ms();
    if t.clouds.values().any(|a| a.window_gpu_ms.keys().any(|k| k.0 % width != 0)) {
        return Err(format!("tenant {name} has GPU-hours buckets not aligned to {width} ms"));
    }
    Ok(())
}

/// What a registration must keep to: names and strings bounded, at most 64 GPUs, a price the
/// planner can add up. Checked when an agent registers and on every restored node.
fn check_node_info(info: &NodeInfo) -> Result<(), Rejection> {
    if !valid_name(&info.name, 253) {
        return Err(Rejection::InvalidArgument {
            field: "name",
            message: "must be 1 to 253 characters of letters, digits, '.', '_' and '-'".into(),
        });
    }
    bounded("region", &info.region, limits::MAX_SHORT_STRING)?;
    bounded("zone", &info.zone, limits::MAX_SHORT_STRING)?;
    bounded("instance_type", &info.instance_type, limits::MAX_SHORT_STRING)?;
    bounded("agent_version", &info.agent_version, limits::MAX_SHORT_STRING)?;
    if info.price_micros_per_gpu_hour > MAX_PRICE_MICROS_PER_GPU_HOUR {
        return Err(Rejection::InvalidArgument {
            field: "price_micros_per_gpu_hour",
            message: format!(
                "{} is more than {MAX_PRICE_MICROS_PER_GPU_HOUR} (${} per GPU-hour)",
                info.price_micros_per_gpu_hour,
                MAX_PRICE_MICROS_PER_GPU_HOUR / 1_000_000
            ),
        });
    }
    if info.gpus.len() > limits::MAX_GPUS_PER_SHARD as usize {
        return Err(Rejection::InvalidArgument {
            field: "gpus",
            message: format!("{} GPUs reported; at most {} per node", info.gpus.len(), limits::MAX_GPUS_PER_SHARD),
        });
    }
    if let Some((lo, hi)) = info.rendezvous_ports
        && (lo < 1024 || lo > hi)
    {
        return Err(Rejection::InvalidArgument {
            field: "rendezvous_ports",
            message: format!("{lo}-{hi}: must be a range of ports from 1024 up, the lowest first"),
        });
    }
    for g in &info.gpus {
        bounded("gpus.uuid", &g.uuid, limits::MAX_SHORT_STRING)?;
        bounded("gpus.model", &g.model, limits::MAX_SHORT_STRING)?;
    }
    if info.labels.len() > limits::MAX_LIST_ITEMS {
        return Err(Rejection::InvalidArgument {
            field: "labels",
            message: format!("at most {} labels", limits::MAX_LIST_ITEMS),
        });
    }
    for (k, v) in &info.labels {
        bounded("labels", k, limits::MAX_SHORT_STRING)?;
        bounded("labels", v, limits::MAX_SHORT_STRING)?;
    }
    Ok(())
}

impl State {
    /// An empty cluster.
    pub fn new() -> State {
        State {
            applied_index: 0,
            next_job: 1,
            next_node: 1,
            next_attempt: 1,
            jobs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            tenants: BTreeMap::new(),
            config: SchedulerConfig::default(),
            acl: crate::acl::Acl::default(),
            idempotency: BTreeMap::new(),
            node_names: BTreeMap::new(),
            live: BTreeMap::new(),
            live_on: BTreeMap::new(),
            pending: BTreeSet::new(),
            array_live: BTreeMap::new(),
            dependents: BTreeMap::new(),
            touched_arrays: BTreeSet::new(),
            ended: Vec::new(),
        }
    }

    // ----- reads -------------------------------------------------------------------------

    /// Log index of the last applied command.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }
    /// All jobs, by id.
    pub fn jobs(&self) -> &BTreeMap<JobId, Arc<Job>> {
        &self.jobs
    }
    /// One job.
    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id).map(|j| &**j)
    }
    /// All nodes, by id.
    pub fn nodes(&self) -> &BTreeMap<NodeId, Arc<Node>> {
        &self.nodes
    }
    /// One node.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id).map(|n| &**n)
    }
    /// A node by its host name.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.node_names.get(name).and_then(|id| self.node(*id))
    }
    /// Tenants, by name.
    pub fn tenants(&self) -> &BTreeMap<String, Tenant> {
        &self.tenants
    }
    /// Tokens and whether ACLs are bootstrapped.
    pub fn acl(&self) -> &crate::acl::Acl {
        &self.acl
    }
    /// Scheduler settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    /// Jobs with at least one pending shard.
    pub fn pending_jobs(&self) -> &BTreeSet<JobId> {
        &self.pending
    }
    /// The live attempts (assigned, running or stopping) on `node`, by id.
    pub fn live_attempts_on(&self, node: NodeId) -> impl Iterator<Item = AttemptId> + '_ {
        self.live_on.get(&node).into_iter().flatten().copied()
    }

    /// Live attempts (assigned, running or stopping) and where they are.
    pub fn live_attempts(&self) -> &BTreeMap<AttemptId, AttemptRef> {
        &self.live
    }
    /// The job and shard of a live attempt.
    pub fn attempt(&self, id: AttemptId) -> Option<(&Job, &Shard)> {
        let r = self.live.get(&id)?;
        let job = self.jobs.get(&r.job)?;
        Some((job, job.shards.get(r.shard as usize)?))
    }

    // ----- snapshot ----------------------------------------------------------------------

    /// A copy of what a snapshot holds, for encoding on another thread while this state moves
    /// on. Jobs and nodes are shared, not copied (milliseconds, where a deep copy took 0.6 s
    /// of the Raft thread at 90,000 running jobs); the derived indexes are left empty, since
    /// [`State::snapshot`] does not write them.
    pub fn snapshot_copy(&self) -> State {
        State {
            applied_index: self.applied_index,
            next_job: self.next_job,
            next_node: self.next_node,
            next_attempt: self.next_attempt,
            jobs: self.jobs.clone(),
            nodes: self.nodes.clone(),
            tenants: self.tenants.clone(),
            config: self.config.clone(),
            acl: self.acl.clone(),
            idempotency: self.idempotency.clone(),
            node_names: BTreeMap::new(),
            live: BTreeMap::new(),
            live_on: BTreeMap::new(),
            pending: BTreeSet::new(),
            array_live: BTreeMap::new(),
            dependents: BTreeMap::new(),
            touched_arrays: BTreeSet::new(),
            ended: Vec::new(),
        }
    }

    /// Serialise the whole state (derived indexes are rebuilt on restore).
    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&SnapshotOut { v: SNAPSHOT_VERSION, state: self }).unwrap_or_default()
    }

    /// Restore a snapshot, rebuild the indexes and check every invariant.
    pub fn restore(bytes: &[u8]) -> Result<State, SnapshotError> {
        // Parsed in one pass, straight into the state: a generic JSON tree of a million jobs
        // would take ten times the memory of the state itself.
        let known = |v: u32| v != 0 && v <= SNAPSHOT_VERSION;
        let snap: SnapshotIn = match serde_json::from_slice(bytes) {
            Ok(snap) => snap,
            Err(e) => {
                return Err(match serde_json::from_slice::<SnapshotVersion>(bytes) {
                    Ok(SnapshotVersion { v }) if !known(v) => SnapshotError::UnknownVersion(v),
                    _ => SnapshotError::Malformed(e.to_string()),
                });
            }
        };
        if !known(snap.v) {
            return Err(SnapshotError::UnknownVersion(snap.v));
        }
        let mut state = snap.state;
        state.check_contents()?;
        state.rebuild_indexes()?;
        state.check_invariants().map_err(SnapshotError::Inconsistent)?;
        Ok(state)
    }

    /// A stable 64-bit digest of the state (FNV-1a over the snapshot encoding). Two servers
    /// that applied the same log have the same hash.
    pub fn hash(&self) -> u64 {
        self.snapshot().iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// What a command would have checked on its way in: every way into the state ends in
    /// `JobSpec::validate`, and every node in the registration's bounds. A snapshot from a file
    /// or a peer has been through neither.
    fn check_contents(&self) -> Result<(), SnapshotError> {
        for (id, job) in &self.jobs {
            if let Err(e) = job.spec.validate() {
                let fe = &e.errors[0];
                return Err(SnapshotError::Inconsistent(format!("jobs.{}.spec.{}: {}", id.0, fe.field, fe.message)));
            }
        }
        for (id, node) in &self.nodes {
            check_node_info(&node.info).map_err(|r| SnapshotError::Inconsistent(format!("nodes.{}.info.{r}", id.0)))?;
        }
        Ok(())
    }

    fn rebuild_indexes(&mut self) -> Result<(), SnapshotError> {
        self.node_names = self.nodes.values().map(|n| (n.info.name.clone(), n.id)).collect();
        self.live.clear();
        self.live_on.clear();
        self.pending.clear();
        for t in self.tenants.values_mut() {
            t.gpus_in_use = 0;
            t.cloud_gpus_in_use.clear();
        }
        self.rebuild_array_indexes();
        for job in self.jobs.values() {
            for shard in &job.shards {
                if shard.state == ShardState::Pending && !job.state.is_terminal() && job.waiting_on.is_empty() {
                    self.pending.insert(job.id);
                }
                if shard.state.is_live() {
                    let a = shard.attempt.as_ref().ok_or_else(|| {
                        SnapshotError::Inconsistent(format!(
                            "{} shard {} is live without an attempt",
                            job.id, shard.index
                        ))
                    })?;
                    self.live.insert(a.id, AttemptRef { job: job.id, shard: shard.index });
                    self.live_on.entry(a.node).or_default().insert(a.id);
                    let cloud =
                        self.nodes.get(&a.node).map(|n| n.info.cloud).ok_or_else(|| {
                            SnapshotError::Inconsistent(format!("{} runs on unknown {}", a.id, a.node))
                        })?;
                    let tenant = self.tenants.get_mut(&job.spec.tenant).ok_or_else(|| {
                        SnapshotError::Inconsistent(format!("{} names unknown tenant {}", job.id, job.spec.tenant))
                    })?;
                    tenant.count_gpus(cloud, u64::from(job.spec.resources.gpus));
                }
            }
        }
        Ok(())
    }

    // ----- apply -------------------------------------------------------------------------

    /// Apply one command. A rejected command changes nothing but the applied index.
    pub fn apply(&mut self, cmd: Command, ctx: ApplyContext) -> ApplyResult {
        self.applied_index = ctx.index;
        let now = ctx.now;
        let mut ev = Vec::new();
        match cmd {
            Command::SubmitJob { spec, idempotency_key, priority_defaulted, submitted_by } => {
                self.submit(spec, idempotency_key, priority_defaulted, submitted_by, now, &mut ev)?
            }
            Command::CancelJob { job, reason } => self.cancel(job, reason, now, &mut ev)?,
            Command::RegisterNode { info } => self.register(info, ctx.index, now, &mut ev)?,
            Command::MarkNodeDown { node, reason, registration } => {
                self.node_down(node, &reason, registration, now, &mut ev)?
            }
            Command::DrainNode { node, reason, deadline } => self.drain(node, reason, deadline, now, &mut ev)?,
            Command::UndrainNode { node } => self.undrain(node, &mut ev)?,
            Command::SetGpuHealth { node, gpu, healthy, reason, xid, cool_down } => {
                self.gpu_health(node, gpu, GpuReport { healthy, reason, xid, cool_down }, now, &mut ev)?
            }
            Command::ApplyPlan { plan } => self.apply_plan(plan, now, &mut ev)?,
            Command::TimeLimit { job, attempt } => self.time_limit(job, attempt, now, &mut ev)?,
            Command::Stalled { job, attempts } => self.stalled(job, attempts, now, &mut ev)?,
            Command::DrainDeadline { node } => self.drain_deadline(node, now, &mut ev)?,
            Command::ShardStarted { attempt } => self.started(attempt, now, &mut ev)?,
            Command::ShardExited { attempt, exit, node_fault, message } => {
                self.exited(attempt, exit, node_fault, message, now, &mut ev)?
            }
            Command::RecordCheckpoint { attempt, step, uri } => self.checkpoint(attempt, step, uri, now, &mut ev)?,
            cmd @ Command::SetTenant { .. } => self.set_tenant(cmd, now, &mut ev)?,
            Command::SetFairShareHalfLife { half_life_ms } => {
                if half_life_ms < 60_000 {
                    return Err(Rejection::InvalidArgument {
                        field: "half_life_ms",
                        message: "must be at least one minute".into(),
                    });
                }
                let old = self.config.fair_share_half_life_ms;
                for t in self.tenants.values_mut() {
                    t.accrue(now, old);
                }
                self.config.fair_share_half_life_ms = half_life_ms;
            }
            Command::Acl { change } => self.acl.apply(change, &mut ev)?,
        }
        self.settle(now, &mut ev);
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariants() {
            panic!("invariant broken after applying index {}: {broken}", ctx.index);
        }
        Ok(ev)
    }

    fn submit(
        &mut self,
        mut spec: crate::spec::JobSpec,
        key: Option<String>,
        priority_defaulted: bool,
        submitted_by: Option<String>,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        spec.validate()?;
        if let Some(who) = &submitted_by {
            if who.is_empty() {
                return Err(Rejection::InvalidArgument { field: "submitted_by", message: "must not be empty".into() });
            }
            bounded("submitted_by", who, MAX_SUBMITTED_BY)?;
        }
        if let Some(k) = &key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
                return Err(Rejection::InvalidArgument {
                    field: "idempotency_key",
                    message: format!("must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
                });
            }
            if let Some(job) = self.idempotency.get(&(spec.tenant.clone(), k.clone())) {
                ev.push(Event::JobSubmitted { job: *job, deduplicated: true });
                return Ok(());
            }
        }
        if let Some(t) = self.tenants.get(&spec.tenant) {
            if priority_defaulted {
                match (t.default_priority, t.max_priority) {
                    (Some(p), _) => spec.priority = p,
                    // A user who gave no priority is not refused for the spec's default.
                    (None, Some(cap)) => spec.priority = spec.priority.min(cap),
                    (None, None) => {}
                }
            }
            if let Some(cap) = t.max_priority
                && spec.priority > cap
            {
                return Err(Rejection::PriorityAboveCap { tenant: t.name.clone(), cap, asked: spec.priority });
            }
        }
        let waiting_on = self.unmet_dependencies(&spec)?;
        let id = JobId(self.next_job);
        if let Some(k) = key {
            self.idempotency.insert((spec.tenant.clone(), k), id);
        }
        self.next_job += 1;
        if !self.tenants.contains_key(&spec.tenant) {
            self.tenants.insert(spec.tenant.clone(), Tenant::new(&spec.tenant, now));
        }
        let shards = (0..spec.shards).map(|index| Shard::new_pending(index, now)).collect();
        let mut job = Job {
            id,
            spec,
            state: JobState::Pending,
            shards,
            submitted_at: now,
            started_at: None,
            finished_at: None,
            failures: 0,
            cancel_requested: false,
            message: None,
            submitted_by,
            events: Vec::new(),
            array: None,
            element_of: None,
            waiting_on,
            stalls: 0,
        };
        self.wait_on(id, &job.waiting_on);
        let (array, waiting) = (job.is_array(), !job.waiting_on.is_empty());
        if array {
            State::new_array_record(&mut job);
        }
        self.jobs.insert(id, Arc::new(job));
        ev.push(Event::JobSubmitted { job: id, deduplicated: false });
        if array {
            self.touched_arrays.insert(id);
        } else if !waiting {
            self.pending.insert(id);
        }
        Ok(())
    }

    fn job_mut(&mut self, id: JobId) -> Result<&mut Job, Rejection> {
        self.jobs.get_mut(&id).map(Arc::make_mut).ok_or(Rejection::UnknownJob(id))
    }

    fn cancel(
        &mut self,
        id: JobId,
        reason: Option<String>,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        if let Some(r) = &reason {
            bounded("reason", r, 1024)?;
        }
        let job = self.job_mut(id)?;
        if job.state.is_terminal() {
            return Err(Rejection::JobFinished { job: id, state: job.state });
        }
        job.cancel_requested = true;
        let reason = reason.unwrap_or_else(|| "cancelled".into());
        job.message = Some(reason.clone());
        if job.is_array() {
            self.cancel_array(id, now, ev);
            return Ok(());
        }
        for i in 0..job.shards.len() as u32 {
            self.end_or_stop(id, i, StopReason::Cancelled, now, ev);
        }
        self.refresh_job(id, now, ev);
        Ok(())
    }

    /// Pending shards end cancelled; live shards are asked to stop for `reason`.
    fn end_or_stop(&mut self, id: JobId, shard: u32, reason: StopReason, now: Timestamp, ev: &mut Vec<Event>) {
        let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) else { return };
        let Some(s) = job.shards.get_mut(shard as usize) else { return };
        if s.state == ShardState::Pending {
            s.state = ShardState::Cancelled;
            ev.push(Event::ShardStateChanged { job: id, shard, state: s.state });
        } else {
            self.stop_shard(id, shard, reason, None, now, ev);
        }
    }

    /// Ask a live shard to stop. A stop that ends the shard for good replaces one that would
    /// requeue it; otherwise the first reason stands.
    fn stop_shard(
        &mut self,
        id: JobId,
        shard: u32,
        reason: StopReason,
        detail: Option<String>,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) {
        let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) else { return };
        let Some(s) = job.shards.get_mut(shard as usize) else { return };
        let replace = match s.state {
            ShardState::Assigned | ShardState::Running => true,
            ShardState::Stopping(old) => old.requeues() && !reason.requeues(),
            _ => false,
        };
        if !replace {
            return;
        }
        let was_stopping = matches!(s.state, ShardState::Stopping(_));
        s.state = ShardState::Stopping(reason);
        if let Some(a) = &s.attempt
            && !was_stopping
        {
            ev.push(Event::StopRequested { job: id, shard, attempt: a.id, node: a.node, reason });
        }
        ev.push(Event::ShardStateChanged { job: id, shard, state: s.state });
        self.note(id, shard, now, JobEventKind::Stopping { reason }, detail);
    }

    /// Record an event of one of the job's shards, naming its current (or last) attempt.
    fn note(&mut self, id: JobId, shard: u32, now: Timestamp, kind: JobEventKind, detail: Option<String>) {
        let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) else { return };
        let attempt = job.shards.get(shard as usize).and_then(|s| s.attempt.as_ref());
        let (attempt, node) = (attempt.map(|a| a.id), attempt.map(|a| a.node));
        crate::timeline::record(job, JobEvent { seq: 0, at: now, kind, shard, attempt, node, detail });
    }

    /// A rank of a gang is lost or failed: the other live ranks restart from the checkpoint.
    fn restart_gang(&mut self, id: JobId, except: u32, now: Timestamp, ev: &mut Vec<Event>) {
        let Some(job) = self.jobs.get(&id) else { return };
        let others: Vec<u32> = job
            .shards
            .iter()
            .filter(|s| s.index != except && matches!(s.state, ShardState::Assigned | ShardState::Running))
            .map(|s| s.index)
            .collect();
        for i in others {
            self.stop_shard(
                id,
                i,
                StopReason::GangRestart,
                Some(format!("shard {except} failed or was lost")),
                now,
                ev,
            );
        }
    }

    /// Free what a live attempt holds. The shard's state is left to the caller.
    fn release(&mut self, id: JobId, shard: u32, now: Timestamp) {
        let Some(job) = self.jobs.get(&id) else { return };
        let Some(a) = job.shards.get(shard as usize).and_then(|s| s.attempt.as_ref()) else { return };
        if self.live.remove(&a.id).is_none() {
            return;
        }
        if let Some(on) = self.live_on.get_mut(&a.node) {
            on.remove(&a.id);
            if on.is_empty() {
                self.live_on.remove(&a.node);
            }
        }
        let (cpu, mem, gpus) = (job.spec.resources.cpu_millis, job.spec.resources.memory_mib, job.spec.resources.gpus);
        if let Some(node) = self.nodes.get_mut(&a.node).map(Arc::make_mut) {
            for g in &a.gpus {
                if let Some(gpu) = node.gpus.get_mut(*g as usize)
                    && gpu.holder == Some(a.id)
                {
                    gpu.holder = None;
                }
            }
            node.cpu_used = node.cpu_used.saturating_sub(cpu);
            node.memory_used = node.memory_used.saturating_sub(mem);
        }
        let half_life = self.config.fair_share_half_life_ms;
        // Nodes are never removed, so the attempt's node gives the cloud its GPUs were counted on.
        let cloud = self.nodes.get(&a.node).map(|n| n.info.cloud);
        if let (Some(t), Some(cloud)) = (self.tenants.get_mut(&job.spec.tenant), cloud) {
            t.release_gpus(cloud, u64::from(gpus), now, half_life);
        }
    }

    fn set_shard(&mut self, id: JobId, shard: u32, state: ShardState, not_before: Timestamp, ev: &mut Vec<Event>) {
        if let Some(s) = self.jobs.get_mut(&id).map(Arc::make_mut).and_then(|j| j.shards.get_mut(shard as usize)) {
            if state == ShardState::Pending && s.attempts > 0 {
                s.restarts += 1;
            }
            s.state = state;
            s.not_before = not_before;
            ev.push(Event::ShardStateChanged { job: id, shard, state });
        }
    }

    /// An attempt is gone without an exit report (node lost or changed): requeue the shard
    /// unless it was being stopped for good, and restart the rest of its gang.
    fn lose_attempt(&mut self, id: JobId, shard: u32, why: &str, now: Timestamp, ev: &mut Vec<Event>) {
        let Some(state) = self.jobs.get(&id).and_then(|j| j.shards.get(shard as usize)).map(|s| s.state) else {
            return;
        };
        self.release(id, shard, now);
        self.note(id, shard, now, JobEventKind::NodeLost, Some(why.to_string()));
        match state {
            ShardState::Stopping(r) if !r.requeues() => self.set_shard(id, shard, r.ends_as(), now, ev),
            _ => {
                self.set_shard(id, shard, ShardState::Pending, now, ev);
                let kind = JobEventKind::Requeued { why: Requeue::NodeLost, not_before: None };
                self.note(id, shard, now, kind, None);
            }
        }
        self.restart_gang(id, shard, now, ev);
        self.refresh_job(id, now, ev);
    }

    /// Recompute a job's state and its membership of the pending set.
    fn refresh_job(&mut self, id: JobId, now: Timestamp, ev: &mut Vec<Event>) {
        let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) else { return };
        if job.is_array() {
            self.touched_arrays.insert(id);
            return;
        }
        let live = job.shards.iter().any(|s| s.state.is_live());
        let pending = job.shards.iter().any(|s| s.state == ShardState::Pending);
        let new = if live {
            JobState::Running
        } else if job.cancel_requested {
            JobState::Cancelled
        } else if job.shards.iter().any(|s| s.state == ShardState::Failed) {
            JobState::Failed
        } else if job.shards.iter().all(|s| s.state == ShardState::Succeeded) {
            JobState::Succeeded
        } else {
            JobState::Pending
        };
        if new.is_terminal() {
            // Nothing of a finished job waits for placement.
            for s in job.shards.iter_mut().filter(|s| s.state == ShardState::Pending) {
                s.state = ShardState::Cancelled;
                ev.push(Event::ShardStateChanged { job: id, shard: s.index, state: s.state });
            }
            job.finished_at.get_or_insert(now);
        }
        if pending && !new.is_terminal() && job.waiting_on.is_empty() {
            self.pending.insert(id);
        } else {
            self.pending.remove(&id);
        }
        if new != job.state {
            let (old, element) = (job.state, job.element_of);
            job.state = new;
            ev.push(Event::JobStateChanged { job: id, state: new });
            if new.is_terminal() {
                self.ended.push(id);
            }
            if let Some(element) = element {
                self.element_moved(element, id, old, new);
            }
        }
    }

    fn register(&mut self, info: NodeInfo, index: u64, now: Timestamp, ev: &mut Vec<Event>) -> Result<(), Rejection> {
        check_node_info(&info)?;

        let existing = self.node_names.get(&info.name).copied();
        let Some(id) = existing else {
            let id = NodeId(self.next_node);
            self.next_node += 1;
            let gpus = info
                .gpus
                .iter()
                .enumerate()
                .map(|(i, g)| Gpu {
                    index: i as u32,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    memory_mib: g.memory_mib,
                    health: GpuHealth::Healthy,
                    holder: None,
                    faults: Vec::new(),
                })
                .collect();
            self.node_names.insert(info.name.clone(), id);
            self.nodes.insert(
                id,
                Arc::new(Node {
                    id,
                    info,
                    gpus,
                    state: NodeState::Ready,
                    cpu_used: 0,
                    memory_used: 0,
                    registered_at: now,
                    registration: index,
                }),
            );
            ev.push(Event::NodeRegistered { node: id, new: true });
            return Ok(());
        };

        // The same host again. If its GPUs changed under live attempts, those attempts are lost.
        let node = &self.nodes[&id];
        let same_gpus = node.info.gpus == info.gpus;
        let same_capacity = info.cpu_millis >= node.cpu_used && info.memory_mib >= node.memory_used;
        if !same_gpus || !same_capacity {
            let lost: Vec<AttemptRef> = self.attempts_on(id);
            for r in lost {
                self.lose_attempt(r.job, r.shard, "it registered again with other GPUs or less CPU or memory", now, ev);
            }
        }
        let old_cloud = self.nodes[&id].info.cloud;
        if old_cloud != info.cloud {
            self.move_cloud(id, old_cloud, info.cloud, now);
        }
        let node = self.nodes.get_mut(&id).map(Arc::make_mut).expect("node id from the name index");
        if !same_gpus {
            let old: BTreeMap<String, (GpuHealth, Vec<Timestamp>)> =
                node.gpus.iter().map(|g| (g.uuid.clone(), (g.health.clone(), g.faults.clone()))).collect();
            node.gpus = info
                .gpus
                .iter()
                .enumerate()
                .map(|(i, g)| Gpu {
                    index: i as u32,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    memory_mib: g.memory_mib,
                    // An unhealthy GPU stays unhealthy across agent restarts, and keeps its faults.
                    health: old.get(&g.uuid).map_or(GpuHealth::Healthy, |o| o.0.clone()),
                    holder: None,
                    faults: old.get(&g.uuid).map_or(Vec::new(), |o| o.1.clone()),
                })
                .collect();
        }
        node.info = info;
        node.registration = index;
        ev.push(Event::NodeRegistered { node: id, new: false });
        if let NodeState::Down { .. } = node.state {
            node.state = NodeState::Ready;
            ev.push(Event::NodeStateChanged { node: id, state: node.state });
        }
        Ok(())
    }

    /// A node that kept its live attempts re-registered in another cloud: its tenants' GPUs
    /// count on the new cloud from now on.
    fn move_cloud(&mut self, node: NodeId, from: Cloud, to: Cloud, now: Timestamp) {
        let half_life = self.config.fair_share_half_life_ms;
        for r in self.attempts_on(node) {
            let Some(job) = self.jobs.get(&r.job) else { continue };
            let gpus = u64::from(job.spec.resources.gpus);
            if let Some(t) = self.tenants.get_mut(&job.spec.tenant) {
                t.release_gpus(from, gpus, now, half_life);
                t.take_gpus(to, gpus, now, half_life);
            }
        }
    }

    fn attempts_on(&self, node: NodeId) -> Vec<AttemptRef> {
        let Some(n) = self.nodes.get(&node) else { return Vec::new() };
        let held: BTreeSet<AttemptId> = n.gpus.iter().filter_map(|g| g.holder).collect();
        held.into_iter().filter_map(|a| self.live.get(&a).copied()).collect()
    }

    fn node_down(
        &mut self,
        id: NodeId,
        reason: &str,
        registration: Option<u64>,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        bounded("reason", reason, 1024)?;
        let node = self.nodes.get(&id).ok_or(Rejection::UnknownNode(id))?;
        if let NodeState::Down { .. } = node.state {
            return Ok(());
        }
        if registration.is_some_and(|r| r != node.registration) {
            return Err(Rejection::FailedPrecondition(format!("{id} registered again since it was judged down")));
        }
        for r in self.attempts_on(id) {
            self.lose_attempt(r.job, r.shard, reason, now, ev);
        }
        let node = self.nodes.get_mut(&id).map(Arc::make_mut).expect("checked above");
        node.state = NodeState::Down { since: now };
        ev.push(Event::NodeStateChanged { node: id, state: node.state });
        Ok(())
    }

    fn drain(
        &mut self,
        id: NodeId,
        reason: DrainReason,
        deadline: Option<Timestamp>,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        let node = self.nodes.get_mut(&id).map(Arc::make_mut).ok_or(Rejection::UnknownNode(id))?;
        reject_if(matches!(node.state, NodeState::Down { .. }), || format!("{id} is down; nothing to drain"))?;
        node.state = NodeState::Draining { reason, deadline };
        ev.push(Event::NodeStateChanged { node: id, state: node.state });
        let stop = match reason {
            DrainReason::Operator => StopReason::Drain,
            DrainReason::SpotInterruption => StopReason::SpotInterruption,
        };
        for r in self.attempts_on(id) {
            let job = &self.jobs[&r.job];
            let shard = &job.shards[r.shard as usize];
            // A shard that declared a runtime ending before the deadline may finish.
            let finishes_in_time = match (deadline, job.spec.max_runtime_secs, &shard.attempt) {
                (Some(d), Some(rt), Some(a)) => a.assigned_at.plus_secs(rt) <= d,
                _ => false,
            };
            if !finishes_in_time {
                let detail = deadline.map(|d| match d.since(now) {
                    0 => "the node goes away now".to_string(),
                    ms => format!("the node goes away in {} s", ms.div_ceil(1000)),
                });
                self.stop_shard(r.job, r.shard, stop, detail, now, ev);
                self.restart_gang(r.job, r.shard, now, ev);
            }
        }
        Ok(())
    }

    /// Whether `attempt` of `job` is live, not stopping, and ran past the job's max runtime.
    pub fn past_time_limit(&self, job: JobId, attempt: AttemptId, now: Timestamp) -> bool {
        let Some(j) = self.jobs.get(&job) else { return false };
        let Some(rt) = j.spec.max_runtime_secs else { return false };
        j.shards.iter().any(|s| {
            matches!(s.state, ShardState::Assigned | ShardState::Running)
                && s.attempt.as_ref().is_some_and(|a| a.id == attempt && a.assigned_at.plus_secs(rt) <= now)
        })
    }

    fn time_limit(
        &mut self,
        id: JobId,
        attempt: AttemptId,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        let job = self.jobs.get(&id).ok_or(Rejection::UnknownJob(id))?;
        reject_if(!self.past_time_limit(id, attempt, now), || format!("{attempt} of {id} is within its time limit"))?;
        let rt = job.spec.max_runtime_secs.unwrap_or(0);
        let n = job.shards.len() as u32;
        if let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) {
            job.message = Some(format!("time limit: ran past its max runtime of {rt} s"));
        }
        for i in 0..n {
            self.end_or_stop(id, i, StopReason::TimeLimit, now, ev);
        }
        self.refresh_job(id, now, ev);
        Ok(())
    }

    fn stalled(
        &mut self,
        id: JobId,
        attempts: Vec<AttemptId>,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        let job = self.jobs.get(&id).ok_or(Rejection::UnknownJob(id))?;
        let timeout = job.spec.progress_timeout_secs.ok_or_else(|| Rejection::InvalidArgument {
            field: "job",
            message: format!("{id} has no progress timeout"),
        })?;
        reject_if(attempts.is_empty() || attempts.len() > job.shards.len(), || "attempts: 1 to one per shard".into())?;
        let mut shards = Vec::new();
        for a in &attempts {
            let r = self.live.get(a).copied().filter(|r| r.job == id).ok_or(Rejection::StaleAttempt(*a))?;
            if matches!(job.shards[r.shard as usize].state, ShardState::Assigned | ShardState::Running) {
                shards.push(r.shard);
            }
        }
        reject_if(shards.is_empty(), || format!("no listed attempt of {id} is running"))?;
        let ranks: Vec<String> = shards.iter().map(u32::to_string).collect();
        let n = job.shards.len() as u32;
        let stalls = self.jobs.get_mut(&id).map(Arc::make_mut).map_or(0, |j| {
            j.stalls += 1;
            j.stalls
        });
        if stalls >= crate::model::MAX_STALLS {
            // Hung again and again from the same checkpoint: restarting would not help.
            if let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) {
                job.message = Some(format!(
                    "hung: no new step for {timeout} s, {stalls} times in a row without a new checkpoint"
                ));
            }
            for i in 0..n {
                let detail = shards.contains(&i).then(|| format!("stalled ranks: {}", ranks.join(", ")));
                self.stop_shard(id, i, StopReason::Hung, detail, now, ev);
            }
            self.refresh_job(id, now, ev);
            return Ok(());
        }
        for s in &shards {
            let detail = format!("no new step for {timeout} s; stalled ranks: {}", ranks.join(", "));
            self.stop_shard(id, *s, StopReason::Stalled, Some(detail), now, ev);
        }
        for s in shards {
            self.restart_gang(id, s, now, ev);
        }
        Ok(())
    }

    /// The live attempts on `node` that its passed drain deadline stops (none if it has none).
    pub fn past_drain_deadline(&self, node: NodeId, now: Timestamp) -> Vec<AttemptRef> {
        let Some(n) = self.nodes.get(&node) else { return Vec::new() };
        let NodeState::Draining { deadline: Some(d), .. } = n.state else { return Vec::new() };
        if d > now {
            return Vec::new();
        }
        self.attempts_on(node)
            .into_iter()
            .filter(|r| {
                self.jobs
                    .get(&r.job)
                    .and_then(|j| j.shards.get(r.shard as usize))
                    .is_some_and(|s| matches!(s.state, ShardState::Assigned | ShardState::Running))
            })
            .collect()
    }

    fn drain_deadline(&mut self, node: NodeId, now: Timestamp, ev: &mut Vec<Event>) -> Result<(), Rejection> {
        let due = self.past_drain_deadline(node, now);
        reject_if(due.is_empty(), || format!("{node} has no shard past a drain deadline"))?;
        let reason = match self.nodes.get(&node).map(|n| n.state) {
            Some(NodeState::Draining { reason: DrainReason::SpotInterruption, .. }) => StopReason::SpotInterruption,
            _ => StopReason::Drain,
        };
        for r in due {
            self.stop_shard(r.job, r.shard, reason, Some("the drain deadline passed".into()), now, ev);
            self.restart_gang(r.job, r.shard, now, ev);
        }
        Ok(())
    }

    fn undrain(&mut self, id: NodeId, ev: &mut Vec<Event>) -> Result<(), Rejection> {
        let node = self.nodes.get_mut(&id).map(Arc::make_mut).ok_or(Rejection::UnknownNode(id))?;
        reject_if(!matches!(node.state, NodeState::Draining { .. }), || format!("{id} is not draining"))?;
        node.state = NodeState::Ready;
        ev.push(Event::NodeStateChanged { node: id, state: node.state });
        Ok(())
    }

    fn gpu_health(
        &mut self,
        id: NodeId,
        gpu: u32,
        report: GpuReport,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        let GpuReport { healthy, reason, xid, cool_down } = report;
        bounded("reason", &reason, 1024)?;
        let node = self.nodes.get_mut(&id).map(Arc::make_mut).ok_or(Rejection::UnknownNode(id))?;
        let g = node.gpus.get_mut(gpu as usize).ok_or(Rejection::UnknownGpu { node: id, gpu })?;
        if !healthy && xid.is_some_and(|x| crate::xid::classify(x) == crate::xid::XidClass::Application) {
            // The program's fault: its attempt fails by itself; the GPU stays in service.
            return Ok(());
        }
        if healthy && cool_down {
            // Only a cool-down that has ended, and only for a GPU that was not retired since.
            let ended = matches!(g.health, GpuHealth::Unhealthy { until: Some(u), .. } if u <= now);
            if !ended {
                return Ok(());
            }
        } else if healthy {
            // An operator clears the GPU: its past faults are forgotten too.
            g.faults.clear();
        }
        if g.healthy() == healthy {
            return Ok(());
        }
        let detail = format!("GPU {gpu}: {reason}");
        g.health = if healthy {
            GpuHealth::Healthy
        } else {
            g.faults.retain(|t| now.since(*t) < crate::xid::FAULT_WINDOW_MS);
            g.faults.push(now);
            let retired = g.faults.len() >= crate::xid::FAULTS_TO_RETIRE;
            let until = (!retired).then(|| now.plus_ms(crate::xid::COOL_DOWN_MS));
            GpuHealth::Unhealthy { reason, since: now, until }
        };
        let holder = g.holder;
        ev.push(Event::GpuHealthChanged { node: id, gpu, healthy });
        if !healthy && let Some(r) = holder.and_then(|a| self.live.get(&a).copied()) {
            self.stop_shard(r.job, r.shard, StopReason::GpuFault, Some(detail), now, ev);
            self.restart_gang(r.job, r.shard, now, ev);
        }
        Ok(())
    }

    fn live_ref(&self, attempt: AttemptId) -> Result<AttemptRef, Rejection> {
        self.live.get(&attempt).copied().ok_or(Rejection::StaleAttempt(attempt))
    }

    fn started(&mut self, attempt: AttemptId, now: Timestamp, ev: &mut Vec<Event>) -> Result<(), Rejection> {
        let r = self.live_ref(attempt)?;
        let s = &mut self.job_mut(r.job)?.shards[r.shard as usize];
        let first = s.attempt.as_ref().is_some_and(|a| a.started_at.is_none());
        if let Some(a) = s.attempt.as_mut() {
            a.started_at.get_or_insert(now);
        }
        if s.state == ShardState::Assigned {
            s.state = ShardState::Running;
            ev.push(Event::ShardStateChanged { job: r.job, shard: r.shard, state: s.state });
        }
        if first {
            self.note(r.job, r.shard, now, JobEventKind::Started, None);
        }
        Ok(())
    }

    fn exited(
        &mut self,
        attempt: AttemptId,
        exit: ExitStatus,
        node_fault: bool,
        message: Option<String>,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        if let Some(m) = &message {
            bounded("message", m, 4096)?;
        }
        let r = self.live_ref(attempt)?;
        let (id, i) = (r.job, r.shard);
        let job = &self.jobs[&id];
        let was = job.shards[i as usize].state;
        let retry = job.spec.retry.clone();
        self.release(id, i, now);
        let kind = JobEventKind::Exited { code: exit.code, signal: exit.signal };
        self.note(id, i, now, kind, message.clone());
        let requeued = |why, not_before| JobEventKind::Requeued { why, not_before };
        if exit.success() {
            self.set_shard(id, i, ShardState::Succeeded, now, ev);
        } else {
            match was {
                ShardState::Stopping(reason) if reason.requeues() => {
                    self.set_shard(id, i, ShardState::Pending, now, ev);
                    self.note(id, i, now, requeued(Requeue::Stopped(reason), None), None);
                    self.restart_gang(id, i, now, ev);
                }
                ShardState::Stopping(r) => self.set_shard(id, i, r.ends_as(), now, ev),
                _ if node_fault => {
                    self.set_shard(id, i, ShardState::Pending, now, ev);
                    self.note(id, i, now, requeued(Requeue::NodeFault, None), None);
                    self.restart_gang(id, i, now, ev);
                }
                _ => {
                    let job = self.jobs.get_mut(&id).map(Arc::make_mut).expect("live attempt's job exists");
                    job.failures += 1;
                    let never = exit.code.is_some_and(|c| retry.never_retry_exit_codes.contains(&c));
                    if never || job.failures >= retry.max_attempts {
                        let why = match (exit.code, exit.signal) {
                            (Some(c), _) if never => format!("shard {i} exited with {c}, which is never retried"),
                            (Some(c), _) => format!("shard {i} exited with {c}; {} attempts used", job.failures),
                            (_, Some(s)) => format!("shard {i} killed by signal {s}; {} attempts used", job.failures),
                            _ => format!("shard {i} failed; {} attempts used", job.failures),
                        };
                        job.message = Some(message.map_or(why.clone(), |m| format!("{why}: {m}")));
                        self.set_shard(id, i, ShardState::Failed, now, ev);
                        let n = self.jobs[&id].shards.len() as u32;
                        for j in (0..n).filter(|j| *j != i) {
                            self.end_or_stop(id, j, StopReason::JobFailed, now, ev);
                        }
                    } else {
                        let not_before = now.plus_secs(retry.backoff_secs);
                        self.set_shard(id, i, ShardState::Pending, not_before, ev);
                        let wait = (retry.backoff_secs > 0).then_some(not_before);
                        self.note(id, i, now, requeued(Requeue::Retry, wait), None);
                        self.restart_gang(id, i, now, ev);
                    }
                }
            }
        }
        self.refresh_job(id, now, ev);
        Ok(())
    }

    fn checkpoint(
        &mut self,
        attempt: AttemptId,
        step: u64,
        uri: String,
        now: Timestamp,
        ev: &mut Vec<Event>,
    ) -> Result<(), Rejection> {
        if uri.is_empty() || uri.len() > limits::MAX_URI_LEN || uri.contains('\0') {
            return Err(Rejection::InvalidArgument {
                field: "uri",
                message: format!("must be 1 to {} bytes without NUL", limits::MAX_URI_LEN),
            });
        }
        let r = self.live_ref(attempt)?;
        let job = self.job_mut(r.job)?;
        let s = &mut job.shards[r.shard as usize];
        if s.checkpoint.as_ref().is_some_and(|c| c.step > step) {
            // An older checkpoint than the one recorded: keep the newer one.
            return Ok(());
        }
        let newer = s.checkpoint.as_ref().is_none_or(|c| step > c.step);
        s.checkpoint = Some(Checkpoint { step, uri, at: now });
        if newer {
            // Progress kept: the hangs before it no longer count.
            job.stalls = 0;
        }
        ev.push(Event::CheckpointRecorded { job: r.job, shard: r.shard, step });
        self.note(r.job, r.shard, now, JobEventKind::Checkpoint { step }, None);
        Ok(())
    }

    fn set_tenant(&mut self, cmd: Command, now: Timestamp, ev: &mut Vec<Event>) -> Result<(), Rejection> {
        let Command::SetTenant {
            name,
            weight,
            gpu_quota,
            max_priority,
            default_priority,
            gpu_hours_quota,
            cloud_gpu_hours_quota,
            gpu_hours_window_ms,
            mode,
        } = cmd
        else {
            return Ok(());
        };
        if !valid_name(&name, limits::MAX_TENANT_LEN) {
            return Err(spec_rejection("tenant", "must be 1 to 64 characters of letters, digits, '.', '_' and '-'"));
        }
        let invalid = |field: &'static str, message: String| Err(Rejection::InvalidArgument { field, message });
        if !(1..=10_000).contains(&weight) {
            return invalid("weight", format!("must be 1 to 10000 (got {weight})"));
        }
        for (field, p) in [("max_priority", max_priority), ("default_priority", default_priority)] {
            if let Some(p) = p
                && p > limits::MAX_PRIORITY
            {
                return invalid(field, format!("must be between 0 and {} (got {p})", limits::MAX_PRIORITY));
            }
        }
        if let (Some(d), Some(m)) = (default_priority, max_priority)
            && d > m
        {
            return invalid("default_priority", format!("{d} is above max_priority {m}"));
        }
        if let Some(q) = gpu_hours_quota
            && !(q.is_finite() && q > 0.0)
        {
            return invalid("gpu_hours_quota", format!("must be a finite number of GPU-hours above 0 (got {q})"));
        }
        for (cloud, q) in &cloud_gpu_hours_quota {
            if !["aws", "azure", "none"].contains(&cloud.as_str()) {
                let shown: String = cloud.chars().take(limits::MAX_SHORT_STRING).collect();
                return invalid(
                    "cloud_gpu_hours_quota",
                    format!("unknown cloud {shown:?} (expected aws, azure or none)"),
                );
            }
            if !(q.is_finite() && *q > 0.0) {
                return invalid(
                    "cloud_gpu_hours_quota",
                    format!("{cloud}: must be a finite number of GPU-hours above 0 (got {q})"),
                );
            }
        }
        if !(MIN_GPU_HOURS_WINDOW_MS..=MAX_GPU_HOURS_WINDOW_MS).contains(&gpu_hours_window_ms) {
            return invalid(
                "gpu_hours_window_ms",
                format!("must be between one minute and 366 days in milliseconds (got {gpu_hours_window_ms})"),
            );
        }
        match (mode, self.tenants.contains_key(&name)) {
            (TenantWrite::Create, true) => return Err(Rejection::TenantExists(name)),
            (TenantWrite::Update, false) => return Err(Rejection::UnknownTenant(name)),
            _ => {}
        }
        let half_life = self.config.fair_share_half_life_ms;
        let t = self.tenants.entry(name.clone()).or_insert_with(|| Tenant::new(&name, now));
        t.accrue(now, half_life);
        t.weight = weight;
        t.gpu_quota = gpu_quota;
        t.max_priority = max_priority;
        t.default_priority = default_priority;
        t.gpu_hours_quota = gpu_hours_quota;
        t.cloud_gpu_hours_quota = cloud_gpu_hours_quota;
        if t.gpu_hours_window_ms != gpu_hours_window_ms {
            t.set_gpu_hours_window(gpu_hours_window_ms);
        }
        ev.push(Event::TenantUpdated { name });
        Ok(())
    }

    // ----- plans -------------------------------------------------------------------------

    fn apply_plan(&mut self, plan: Plan, now: Timestamp, ev: &mut Vec<Event>) -> Result<(), Rejection> {
        for gang in plan.placements {
            let job = gang.job;
            match self.check_gang(&gang, now) {
                Ok(()) => {
                    for p in gang.shards {
                        self.assign(job, p.shard, p.node, p.gpus, now, ev);
                    }
                    self.refresh_job(job, now, ev);
                }
                Err(reason) => ev.push(Event::PlacementRejected { job, reason }),
            }
        }
        for pre in plan.preemptions {
            match self.check_preemption(&pre, now) {
                Ok(()) => {
                    for victim in pre.victims {
                        let n = self.jobs[&victim].shards.len() as u32;
                        for i in 0..n {
                            self.stop_shard(victim, i, StopReason::Preempted { by: pre.job }, None, now, ev);
                        }
                    }
                }
                Err(reason) => ev.push(Event::PlacementRejected { job: pre.job, reason }),
            }
        }
        Ok(())
    }

    /// Re-check a planned gang against the current state (the plan may have gone stale).
    fn check_gang(&self, gang: &GangPlacement, now: Timestamp) -> Result<(), String> {
        let job = self.jobs.get(&gang.job).ok_or("job no longer exists")?;
        if job.state.is_terminal() || job.cancel_requested {
            return Err("job has finished or is being cancelled".into());
        }
        if !job.waiting_on.is_empty() {
            return Err("job waits on its dependencies".into());
        }
        if job.shards.iter().any(|s| s.state.is_live()) {
            return Err("job still has live shards".into());
        }
        let pending: BTreeSet<u32> =
            job.shards.iter().filter(|s| s.state == ShardState::Pending).map(|s| s.index).collect();
        let planned: BTreeSet<u32> = gang.shards.iter().map(|p| p.shard).collect();
        if planned.len() != gang.shards.len() || planned != pending || pending.is_empty() {
            return Err("plan does not place exactly the pending shards".into());
        }
        if job.shards.iter().any(|s| s.state == ShardState::Pending && s.not_before > now) {
            return Err("shard is still in its retry backoff".into());
        }
        let spec = &job.spec;
        let mut taken: BTreeMap<NodeId, (u64, u64, BTreeSet<u32>)> = BTreeMap::new();
        let mut nodes = Vec::new();
        for p in &gang.shards {
            let node = self.nodes.get(&p.node).ok_or_else(|| format!("{} no longer exists", p.node))?;
            if !node.schedulable() {
                return Err(format!("{} is not ready", p.node));
            }
            if !node_admits(spec, node) {
                return Err(format!("{} does not meet the job's constraints", p.node));
            }
            if p.gpus.len() != spec.resources.gpus as usize {
                return Err(format!(
                    "shard {} planned with {} GPUs, needs {}",
                    p.shard,
                    p.gpus.len(),
                    spec.resources.gpus
                ));
            }
            let t = taken.entry(p.node).or_default();
            for g in &p.gpus {
                let gpu = node.gpus.get(*g as usize).ok_or_else(|| format!("{} has no GPU {g}", p.node))?;
                if gpu.holder.is_some()
                    || !gpu.healthy()
                    || !spec.gpu_matches(&gpu.model, gpu.memory_mib)
                    || !t.2.insert(*g)
                {
                    return Err(format!("GPU {g} of {} is not available", p.node));
                }
            }
            t.0 += spec.resources.cpu_millis;
            t.1 += spec.resources.memory_mib;
            if (spec.resources.cpu_millis > 0 && node.cpu_used + t.0 > node.info.cpu_millis)
                || (spec.resources.memory_mib > 0 && node.memory_used + t.1 > node.info.memory_mib)
            {
                return Err(format!("{} lacks CPU or memory", p.node));
            }
            nodes.push(node);
        }
        if !span_ok(spec, nodes.iter().map(|n| &n.info)) {
            return Err("placement spans clouds or regions the job does not allow".into());
        }
        if let Some(t) = self.tenants.get(&spec.tenant)
            && let Some(q) = t.gpu_quota
            && t.gpus_in_use + spec.total_gpus() > q
        {
            return Err(format!("tenant {} would exceed its quota of {q} GPUs", spec.tenant));
        }
        if let Some(t) = self.tenants.get(&spec.tenant) {
            let clouds: BTreeSet<Cloud> = nodes.iter().map(|n| n.info.cloud).collect();
            if let Some(c) = clouds.into_iter().find(|c| t.gpu_hours_exhausted_on(*c, now)) {
                return Err(format!("tenant {} has used its GPU-hours quota for {c} in this window", spec.tenant));
            }
        }
        Ok(())
    }

    fn check_preemption(&self, pre: &Preemption, now: Timestamp) -> Result<(), String> {
        let job = self.jobs.get(&pre.job).ok_or("job no longer exists")?;
        if !self.pending.contains(&pre.job) || job.cancel_requested {
            return Err("job no longer waits for placement".into());
        }
        if self.tenants.get(&job.spec.tenant).is_some_and(|t| t.gpu_hours_exhausted(now)) {
            return Err(format!("tenant {} has used its GPU-hours quota in this window", job.spec.tenant));
        }
        if pre.victims.is_empty() {
            return Err("preemption without victims".into());
        }
        for v in &pre.victims {
            let victim = self.jobs.get(v).ok_or_else(|| format!("victim {v} no longer exists"))?;
            if victim.spec.priority >= job.spec.priority {
                return Err(format!("victim {v} does not have a lower priority"));
            }
            if !victim.shards.iter().any(|s| matches!(s.state, ShardState::Assigned | ShardState::Running)) {
                return Err(format!("victim {v} is no longer running"));
            }
        }
        Ok(())
    }

    /// The lowest rendezvous port of `node`'s range that no live gang's rank 0 there holds.
    fn free_port(&self, node: NodeId) -> Option<u16> {
        let n = self.nodes.get(&node)?;
        let (lo, hi) = n.info.rendezvous_ports.unwrap_or(crate::model::DEFAULT_RENDEZVOUS_PORTS);
        let used: BTreeSet<u16> = self
            .live_on
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|a| {
                let r = self.live.get(a)?;
                self.jobs.get(&r.job)?.shards.get(r.shard as usize)?.attempt.as_ref()?.port
            })
            .collect();
        (lo..=hi).find(|p| !used.contains(p))
    }

    fn assign(&mut self, id: JobId, shard: u32, node_id: NodeId, gpus: Vec<u32>, now: Timestamp, ev: &mut Vec<Event>) {
        let port = if shard == 0 { self.free_port(node_id) } else { None };
        let attempt = AttemptId(self.next_attempt);
        self.next_attempt += 1;
        let half_life = self.config.fair_share_half_life_ms;
        let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) else { return };
        let res = job.spec.resources.clone();
        let s = &mut job.shards[shard as usize];
        s.attempts += 1;
        let number = s.attempts;
        s.state = ShardState::Assigned;
        s.attempt = Some(Attempt {
            id: attempt,
            number,
            node: node_id,
            gpus: gpus.clone(),
            assigned_at: now,
            started_at: None,
            port,
        });
        job.started_at.get_or_insert(now);
        let resume = job.resume_point(shard).map(|c| (c.uri.clone(), c.step));
        let detail = resume.as_ref().map(|(_, step)| format!("resumes from the checkpoint at step {step}"));
        crate::timeline::record(
            job,
            JobEvent {
                seq: 0,
                at: now,
                kind: JobEventKind::Placed { number },
                shard,
                attempt: Some(attempt),
                node: Some(node_id),
                detail,
            },
        );
        let resume_from = resume.map(|(uri, _)| uri);
        let cloud = self.nodes.get(&node_id).map(|n| n.info.cloud);
        if let (Some(t), Some(cloud)) = (self.tenants.get_mut(&job.spec.tenant), cloud) {
            t.take_gpus(cloud, u64::from(res.gpus), now, half_life);
        }
        if let Some(node) = self.nodes.get_mut(&node_id).map(Arc::make_mut) {
            for g in &gpus {
                node.gpus[*g as usize].holder = Some(attempt);
            }
            node.cpu_used += res.cpu_millis;
            node.memory_used += res.memory_mib;
        }
        self.live.insert(attempt, AttemptRef { job: id, shard });
        self.live_on.entry(node_id).or_default().insert(attempt);
        ev.push(Event::ShardAssigned { job: id, shard, attempt, number, node: node_id, gpus, resume_from });
    }

    // ----- invariants --------------------------------------------------------------------

    /// Check every invariant; the first broken one is described. It never panics, whatever the
    /// state holds: it also judges snapshots from files and from peers.
    pub fn check_invariants(&self) -> Result<(), String> {
        // The shape every index relies on: each job, node and tenant is stored under its own
        // id or name, and each shard and GPU sits at the position its index says.
        for (id, job) in &self.jobs {
            if job.id != *id {
                return Err(format!("jobs.{}.id is {}", id.0, job.id.0));
            }
            if job.shards.len() != job.spec.shards as usize && !job.is_array() {
                return Err(format!(
                    "jobs.{}.shards has {} shards, its spec {}",
                    id.0,
                    job.shards.len(),
                    job.spec.shards
                ));
            }
            if let Some((i, s)) = job.shards.iter().enumerate().find(|(i, s)| s.index as usize != *i) {
                return Err(format!("jobs.{}.shards[{i}].index is {}", id.0, s.index));
            }
            if job.events.len() > crate::timeline::MAX_EVENTS {
                return Err(format!("jobs.{}.events holds {} events", id.0, job.events.len()));
            }
            if let Some((i, e)) = job.events.iter().enumerate().find(|(_, e)| {
                e.shard >= job.spec.shards || e.detail.as_ref().is_some_and(|d| d.len() > crate::timeline::MAX_DETAIL)
            }) {
                return Err(format!("jobs.{}.events[{i}] names shard {} or has a detail too long", id.0, e.shard));
            }
            if let Some(i) = job.events.windows(2).position(|w| w[0].seq >= w[1].seq) {
                return Err(format!("jobs.{}.events[{}] is not numbered after the one before it", id.0, i + 1));
            }
        }
        for (id, node) in &self.nodes {
            if node.id != *id {
                return Err(format!("nodes.{}.id is {}", id.0, node.id.0));
            }
            if node.gpus.len() != node.info.gpus.len() {
                return Err(format!(
                    "nodes.{}.gpus has {} GPUs, its info {}",
                    id.0,
                    node.gpus.len(),
                    node.info.gpus.len()
                ));
            }
            if let Some((i, g)) = node.gpus.iter().enumerate().find(|(i, g)| g.index as usize != *i) {
                return Err(format!("nodes.{}.gpus[{i}].index is {}", id.0, g.index));
            }
            if let Some(g) = node.gpus.iter().find(|g| g.faults.len() > crate::xid::FAULTS_TO_RETIRE) {
                return Err(format!("nodes.{}.gpus[{}].faults holds {} faults", id.0, g.index, g.faults.len()));
            }
        }
        if let Some((name, t)) = self.tenants.iter().find(|(name, t)| t.name != **name) {
            return Err(format!("tenants.{name}.name is {}", t.name));
        }
        let mut held = 0usize;
        for node in self.nodes.values() {
            let mut cpu = 0;
            let mut mem = 0;
            let mut seen = BTreeSet::new();
            for gpu in &node.gpus {
                let Some(a) = gpu.holder else { continue };
                held += 1;
                let (job, shard) =
                    self.attempt(a).ok_or_else(|| format!("{} GPU {} held by dead {a}", node.id, gpu.index))?;
                let att = shard
                    .attempt
                    .as_ref()
                    .filter(|x| x.id == a)
                    .ok_or_else(|| format!("{a} is not its shard's attempt"))?;
                if att.node != node.id || !att.gpus.contains(&gpu.index) {
                    return Err(format!("{} GPU {} held by {a}, which does not list it", node.id, gpu.index));
                }
                if !gpu.healthy() && !matches!(shard.state, ShardState::Stopping(_)) {
                    return Err(format!("unhealthy GPU {} of {} runs {a}, which is not stopping", gpu.index, node.id));
                }
                if seen.insert(a) {
                    cpu += job.spec.resources.cpu_millis;
                    mem += job.spec.resources.memory_mib;
                }
            }
            if matches!(node.state, NodeState::Down { .. }) && !seen.is_empty() {
                return Err(format!("{} is down but holds attempts", node.id));
            }
            if cpu != node.cpu_used || mem != node.memory_used {
                return Err(format!(
                    "{} CPU/memory counters {}/{} differ from attempts {cpu}/{mem}",
                    node.id, node.cpu_used, node.memory_used
                ));
            }
            if self.node_names.get(&node.info.name) != Some(&node.id) || node.id.0 >= self.next_node {
                return Err(format!("{} missing from the name index or beyond the id counter", node.id));
            }
        }
        let mut live_gpus = 0usize;
        let mut tenant_gpus: BTreeMap<&str, u64> = BTreeMap::new();
        let mut tenant_cloud_gpus: BTreeMap<&str, BTreeMap<Cloud, u64>> = BTreeMap::new();
        let mut live_count = 0usize;
        for job in self.jobs.values() {
            if job.id.0 >= self.next_job {
                return Err(format!("{} is beyond the id counter", job.id));
            }
            let live = job.shards.iter().filter(|s| s.state.is_live()).count();
            let pending = job.shards.iter().any(|s| s.state == ShardState::Pending);
            let stopping = job.shards.iter().any(|s| matches!(s.state, ShardState::Stopping(_)));
            if pending && live > 0 && !stopping {
                return Err(format!("{} has pending and running shards at once: gang not whole", job.id));
            }
            if job.state.is_terminal() && (live > 0 || pending) {
                return Err(format!("{} is {:?} but still has live or pending shards", job.id, job.state));
            }
            if (pending && !job.state.is_terminal() && job.waiting_on.is_empty()) != self.pending.contains(&job.id) {
                return Err(format!("{} pending index is wrong", job.id));
            }
            for s in job.shards.iter().filter(|s| s.state.is_live()) {
                let a =
                    s.attempt.as_ref().ok_or_else(|| format!("{} shard {} live without attempt", job.id, s.index))?;
                if self.live.get(&a.id) != Some(&AttemptRef { job: job.id, shard: s.index })
                    || a.id.0 >= self.next_attempt
                {
                    return Err(format!("{} is missing from the live index", a.id));
                }
                if !self.live_on.get(&a.node).is_some_and(|on| on.contains(&a.id)) {
                    return Err(format!("{} is missing from the live index of {}", a.id, a.node));
                }
                if a.gpus.len() != job.spec.resources.gpus as usize {
                    return Err(format!("{} holds {} GPUs, spec says {}", a.id, a.gpus.len(), job.spec.resources.gpus));
                }
                let node = self.nodes.get(&a.node).ok_or_else(|| format!("{} on unknown {}", a.id, a.node))?;
                for g in &a.gpus {
                    if node.gpus.get(*g as usize).and_then(|x| x.holder) != Some(a.id) {
                        return Err(format!("{} lists GPU {g} of {} but does not hold it", a.id, a.node));
                    }
                }
                live_gpus += a.gpus.len();
                live_count += 1;
                *tenant_gpus.entry(job.spec.tenant.as_str()).or_default() += u64::from(job.spec.resources.gpus);
                if job.spec.resources.gpus > 0 {
                    *tenant_cloud_gpus
                        .entry(job.spec.tenant.as_str())
                        .or_default()
                        .entry(node.info.cloud)
                        .or_default() += u64::from(job.spec.resources.gpus);
                }
            }
        }
        if live_gpus != held {
            return Err(format!("live attempts list {live_gpus} GPUs but nodes show {held} held"));
        }
        if live_count != self.live.len() {
            return Err(format!("live index has {} attempts, shards show {live_count}", self.live.len()));
        }
        let on_nodes: usize = self.live_on.values().map(BTreeSet::len).sum();
        if on_nodes != live_count || self.live_on.values().any(BTreeSet::is_empty) {
            return Err(format!("the per-node live index has {on_nodes} attempts, shards show {live_count}"));
        }
        for t in self.tenants.values() {
            let want = tenant_gpus.get(t.name.as_str()).copied().unwrap_or(0);
            if t.gpus_in_use != want {
                return Err(format!("tenant {} counts {} GPUs in use, attempts show {want}", t.name, t.gpus_in_use));
            }
            let empty = BTreeMap::new();
            let want = tenant_cloud_gpus.get(t.name.as_str()).unwrap_or(&empty);
            if t.cloud_gpus_in_use != *want {
                return Err(format!(
                    "tenant {} counts {:?} GPUs in use per cloud, attempts show {want:?}",
                    t.name, t.cloud_gpus_in_use
                ));
            }
            check_tenant_settings(t)?;
        }
        for ((tenant, _), job) in &self.idempotency {
            if self.jobs.get(job).is_none_or(|j| j.spec.tenant != *tenant) {
                return Err(format!("idempotency key of tenant {tenant} points at {job}, not one of its jobs"));
            }
        }
        for job in self.jobs.values() {
            if !self.tenants.contains_key(&job.spec.tenant) {
                return Err(format!("{} names unknown tenant {}", job.id, job.spec.tenant));
            }
        }
        self.check_arrays()
    }
}
