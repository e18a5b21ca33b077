//! Why a pending job waits, and what would let it run (`tessera job why`, and the reason
//! column of `job list`).
//!
//! The planner records why each job it looked at stayed pending ([`WaitReason`]), in coarse
//! kinds, and it skips the queue walk altogether when no GPU is free. [`explain`] makes the
//! reason precise for one job: it walks the fleet through the job's constraints one at a time
//! (a funnel: nodes registered, ready, admitted by its placement rules, with enough healthy
//! GPUs of its model, with them free now), reads its tenant's quotas and counts the jobs ahead
//! of it in the queue. [`Briefs`] is the cheap form for listings: one fleet walk per shape.
//! Both are pure: the caller passes the time and, if it has one, the last planning round's
//! reason.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::model::{Job, JobId, JobState, Node, NodeState, ShardState, StopReason, Timestamp};
use crate::placement::node_admits;
use crate::planner::WaitReason;
use crate::spec::{JobSpec, Placement, Resources, SpotPolicy};
use crate::state::State;

/// The kind of reason, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WhyKind {
    /// Not pending: nothing holds it back.
    NotPending,
    /// A cancel was requested; it will not be placed.
    Cancelling,
    /// Some of its shards still hold GPUs (a gang restarting waits for them to stop).
    ShardsStopping,
    /// A failed gang waits out its retry backoff.
    Backoff,
    /// Its tenant has used its GPU-hours quota of the window.
    GpuHoursQuota,
    /// Its tenant would go over its GPU quota.
    Quota,
    /// No node (or not enough nodes) meets its constraints, free or not.
    Constraint,
    /// Lower-priority jobs are stopping to make room for it.
    AwaitingPreemption,
    /// It holds the backfill reservation: GPUs are kept for it.
    Reserved,
    /// Eligible GPUs exist, but not enough are free now.
    Capacity,
    /// The last planning round hit its size limit before it; it is tried next round.
    PlanFull,
    /// Everything it needs is free: the next planning round places it.
    NextRound,
    /// It waits for jobs it depends on (`after_ok`, `after_any`) to end.
    Dependency,
    /// A job array: its elements wait (each has its own reason), or its `%N` limit holds the
    /// next ones back.
    Array,
}

impl WhyKind {
    /// Short upper-case name, like Slurm's REASON column.
    pub fn as_str(self) -> &'static str {
        match self {
            WhyKind::NotPending => "NOT_PENDING",
            WhyKind::Cancelling => "CANCELLING",
            WhyKind::ShardsStopping => "SHARDS_STOPPING",
            WhyKind::Backoff => "BACKOFF",
            WhyKind::GpuHoursQuota => "GPU_HOURS_QUOTA",
            WhyKind::Quota => "GPU_QUOTA",
            WhyKind::Constraint => "CONSTRAINT",
            WhyKind::AwaitingPreemption => "PREEMPTING",
            WhyKind::Reserved => "RESERVED",
            WhyKind::Capacity => "CAPACITY",
            WhyKind::PlanFull => "PLAN_FULL",
            WhyKind::NextRound => "NEXT_ROUND",
            WhyKind::Dependency => "DEPENDENCY",
            WhyKind::Array => "ARRAY",
        }
    }
}

/// One step of the funnel: how many nodes are left once this constraint applies, and how many
/// of the job's shards those nodes could hold at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The constraint, for people ("ready (not drained or down)").
    pub label: String,
    /// Nodes left.
    pub nodes: usize,
}

/// Why one job waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Why {
    /// The kind.
    pub kind: WhyKind,
    /// One sentence: why it waits now.
    pub reason: String,
    /// The fleet through the job's constraints (empty when the job is not held back by
    /// capacity or constraints, like a job in backoff).
    pub funnel: Vec<Step>,
    /// What would let it run, most direct first; empty when only time will.
    pub remedies: Vec<String>,
    /// Pending jobs the planner considers before it: of higher priority, and of the same
    /// priority whose tenant is further below its fair share or which came first.
    pub ahead: usize,
}

/// Reasons for listings: the planner's where it judged the job, else what the job's own state
/// and its tenant say, else what the fleet says. The fleet is walked once per distinct shape
/// (resources, placement rules, shards waiting) in a listing, not once per job, so a page of a
/// deep queue costs a few walks.
pub struct Briefs<'a> {
    state: &'a State,
    now: Timestamp,
    /// (could ever fit, fits now) by shape.
    fits: HashMap<(&'a Resources, &'a Placement, u32), (bool, bool)>,
}

impl<'a> Briefs<'a> {
    /// Reasons as of `now`.
    pub fn new(state: &'a State, now: Timestamp) -> Briefs<'a> {
        Briefs { state, now, fits: HashMap::new() }
    }

    /// The short reason `job` waits; None for a job that is not waiting.
    pub fn reason(&mut self, job: &'a Job, planned: Option<&WaitReason>) -> Option<(WhyKind, String)> {
        let (state, now) = (self.state, self.now);
        if let Some(early) = own_reason(state, job, now) {
            return early.map(|(k, m, _)| (k, m));
        }
        let want = pending_shards(job);
        let need = need_text(&job.spec, want);
        Some(match planned {
            Some(WaitReason::Quota) => (WhyKind::Quota, quota_text(state, job)),
            Some(WaitReason::GpuHoursQuota) => (WhyKind::GpuHoursQuota, gpu_hours_text(state, job, now)),
            Some(WaitReason::Backoff) => (WhyKind::Backoff, "waits out its retry backoff".into()),
            Some(WaitReason::Reserved(at)) => (WhyKind::Reserved, reserved_text(*at, now)),
            Some(WaitReason::AwaitingPreemption) => {
                (WhyKind::AwaitingPreemption, "lower-priority jobs are stopping to make room for it".into())
            }
            Some(WaitReason::Unschedulable) => (WhyKind::Constraint, need + ": no set of nodes could ever hold it"),
            Some(WaitReason::PlanFull) => (WhyKind::PlanFull, "the last planning round was full before it".into()),
            Some(WaitReason::NoCapacity) | None => {
                let spec = &job.spec;
                let (ever, now_free) =
                    *self.fits.entry((&spec.resources, &spec.placement, want)).or_insert_with(|| {
                        let f = Funnel::walk(state, spec);
                        (f.best_total >= want, f.best_free >= want)
                    });
                match (ever, now_free, planned) {
                    (false, _, _) => (WhyKind::Constraint, need + ": no set of nodes could ever hold it"),
                    // Not yet judged, and room for it: the next round places it.
                    (true, true, None) => (WhyKind::NextRound, need + ": free now; the next planning round places it"),
                    _ => (WhyKind::Capacity, need + ": not free now"),
                }
            }
        })
    }
}

/// The short reason of one job: [`Briefs::reason`] for a single job.
pub fn brief(state: &State, job: &Job, planned: Option<&WaitReason>, now: Timestamp) -> Option<(WhyKind, String)> {
    Briefs::new(state, now).reason(job, planned)
}

/// The full diagnosis of one job (see the module's description). None if there is no such job.
pub fn explain(state: &State, id: JobId, planned: Option<&WaitReason>, now: Timestamp) -> Option<Why> {
    let job = state.job(id)?;
    let (higher, same) = if job.state == JobState::Pending { ahead_count(state, job, now) } else { (0, 0) };
    let ahead = higher + same;
    let why = |kind, reason: String, funnel, remedies| Some(Why { kind, reason, funnel, remedies, ahead });
    if let Some(early) = own_reason(state, job, now) {
        return match early {
            None => {
                why(WhyKind::NotPending, format!("it is {}, not pending", job.state.as_str()), Vec::new(), Vec::new())
            }
            Some((kind, reason, remedies)) => why(kind, reason, Vec::new(), remedies),
        };
    }
    let spec = &job.spec;
    let want = pending_shards(job);
    let need = need_text(spec, want);
    let f = Funnel::walk(state, spec);
    let steps = f.steps(spec);

    // Could it ever fit, all GPUs free?
    if f.best_total < want {
        let (reason, remedies) = f.why_never(spec, want, &need);
        return why(WhyKind::Constraint, reason, steps, remedies);
    }
    match planned {
        Some(WaitReason::AwaitingPreemption) => {
            let victims: Vec<String> = stopping_for(state, id).iter().map(|j| j.to_string()).collect();
            let reason = if victims.is_empty() {
                "lower-priority jobs are being stopped to make room for it".to_string()
            } else {
                format!("lower-priority jobs {} are stopping to make room for it", victims.join(", "))
            };
            return why(WhyKind::AwaitingPreemption, reason, steps, Vec::new());
        }
        Some(WaitReason::Reserved(at)) => {
            return why(WhyKind::Reserved, format!("{need}; {}", reserved_text(*at, now)), steps, Vec::new());
        }
        Some(WaitReason::PlanFull) => {
            return why(
                WhyKind::PlanFull,
                "the last planning round reached its size limit before this job; the next round tries it".into(),
                steps,
                Vec::new(),
            );
        }
        _ => {}
    }
    if f.best_free >= want {
        return why(
            WhyKind::NextRound,
            format!("{need}: enough is free now, and the next planning round places it"),
            steps,
            Vec::new(),
        );
    }
    let mut remedies = Vec::new();
    if spec.placement.spot == SpotPolicy::Avoid && f.spot_free + f.best_free >= want {
        remedies.push(format!(
            "allow spot nodes (placement.spot = \"allow\"): spot nodes have room for {} of its shards now",
            f.spot_free
        ));
    }
    if !spec.placement.span_regions && !spec.placement.span_clouds && f.free_slots >= want {
        remedies.push(format!(
            "allow its shards to span regions (placement.span_regions = true): {} shards fit now across regions, at most {} in one",
            f.free_slots, f.best_free
        ));
    }
    if f.smaller_fits_now > 0 && want > 0 {
        remedies.push(format!(
            "ask for fewer GPUs per shard: {} more GPUs of its kind are free, but not {} together on one node",
            f.smaller_fits_now, spec.resources.gpus
        ));
    }
    let ends = earliest_end(state, spec, now);
    let wait = match ends {
        Some(t) if t != Timestamp::NEVER => {
            format!("the first running job on eligible nodes declares its end in {}", span(t.since(now) / 1000))
        }
        _ => "running jobs on eligible nodes declare no end".to_string(),
    };
    let behind = if ahead > 0 {
        format!("; {higher} jobs of higher priority and {same} of its priority are ahead of it")
    } else {
        String::new()
    };
    let reason = format!(
        "{need}: eligible nodes have room for {} of its shards now ({} with every GPU free); {wait}{behind}",
        f.best_free, f.best_total
    );
    remedies.push("wait: it starts when eligible GPUs free up, in queue order".into());
    why(WhyKind::Capacity, reason, steps, remedies)
}

/// What the job's own state and its tenant say, before any fleet walk: `Some(None)` when it is
/// not pending, `Some(Some(..))` for a reason found, None to look further.
#[allow(clippy::type_complexity)]
fn own_reason(state: &State, job: &Job, now: Timestamp) -> Option<Option<(WhyKind, String, Vec<String>)>> {
    // An array waits while some of its elements do, or are not created yet, running or not.
    let array_waits = job
        .array
        .as_ref()
        .zip(job.spec.array.as_ref())
        .is_some_and(|(p, a)| !job.state.is_terminal() && (p.queued > 0 || p.next < a.len()));
    if job.state != JobState::Pending && !job.shards.iter().any(|s| s.state == ShardState::Pending) && !array_waits {
        return Some(None);
    }
    if job.cancel_requested {
        return Some(Some((WhyKind::Cancelling, "a cancel was requested: it will not be placed".into(), Vec::new())));
    }
    if !job.waiting_on.is_empty() {
        let list: Vec<String> = job.waiting_on.iter().map(|d| d.to_string()).collect();
        let ok = job.waiting_on.iter().any(|d| job.spec.after_ok.contains(&d.0));
        let how = if ok { "; if an after-ok one does not succeed, this job is cancelled" } else { "" };
        return Some(Some((
            WhyKind::Dependency,
            format!("waits for {} to end{how}", list.join(", ")),
            vec![format!("cancel the dependency, or cancel this job: it runs only after {}", list.join(", "))],
        )));
    }
    if let (Some(spec), Some(p)) = (&job.spec.array, &job.array) {
        let total = spec.len();
        let limit = match spec.max_running {
            Some(m) if p.active >= m => format!("; its limit of {m} unfinished at once holds back the rest"),
            _ => String::new(),
        };
        return Some(Some((
            WhyKind::Array,
            format!(
                "array of {total}: {} elements waiting for placement, {} not created yet{limit} (each element's own reason: tessera job list --array {})",
                p.queued,
                total.saturating_sub(p.next),
                job.id.0
            ),
            Vec::new(),
        )));
    }
    let live = job.shards.iter().filter(|s| s.state.is_live()).count();
    if live > 0 {
        return Some(Some((
            WhyKind::ShardsStopping,
            format!("{live} of its shards still hold GPUs; the gang is placed again once they have stopped"),
            Vec::new(),
        )));
    }
    if let Some(until) = job.shards.iter().filter(|s| s.state == ShardState::Pending).map(|s| s.not_before).max()
        && until > now
    {
        return Some(Some((
            WhyKind::Backoff,
            format!(
                "it failed ({} of {} attempts used) and waits out its retry backoff: eligible again in {}",
                job.failures,
                job.spec.retry.max_attempts,
                span(until.since(now) / 1000)
            ),
            Vec::new(),
        )));
    }
    let tenant = state.tenants().get(&job.spec.tenant)?;
    if tenant.gpu_hours_exhausted(now) {
        return Some(Some((
            WhyKind::GpuHoursQuota,
            gpu_hours_text(state, job, now),
            vec![format!(
                "an operator raises tenant {}'s GPU-hours quota, or its usage ages out of the window",
                tenant.name
            )],
        )));
    }
    if let Some(q) = tenant.gpu_quota
        && tenant.gpus_in_use + job.spec.total_gpus() > q
    {
        let remedies = if job.spec.total_gpus() > q {
            vec![format!(
                "it alone needs more than the quota: an operator raises tenant {}'s GPU quota to at least {}, or resubmit it smaller",
                tenant.name,
                job.spec.total_gpus()
            )]
        } else {
            vec![
                format!(
                    "wait: it fits once tenant {}'s running jobs free {} GPUs",
                    tenant.name,
                    tenant.gpus_in_use + job.spec.total_gpus() - q
                ),
                format!(
                    "an operator raises tenant {}'s GPU quota to at least {}",
                    tenant.name,
                    tenant.gpus_in_use + job.spec.total_gpus()
                ),
            ]
        };
        return Some(Some((WhyKind::Quota, quota_text(state, job), remedies)));
    }
    None
}

fn pending_shards(job: &Job) -> u32 {
    job.shards.iter().filter(|s| s.state == ShardState::Pending).count() as u32
}

fn quota_text(state: &State, job: &Job) -> String {
    match state.tenants().get(&job.spec.tenant) {
        Some(t) => format!(
            "tenant {} holds {} GPUs of its quota of {}, and this job needs {}",
            t.name,
            t.gpus_in_use,
            t.gpu_quota.map(|q| q.to_string()).unwrap_or_else(|| "none".into()),
            job.spec.total_gpus()
        ),
        None => "its tenant's GPU quota is reached".into(),
    }
}

fn gpu_hours_text(state: &State, job: &Job, now: Timestamp) -> String {
    match state.tenants().get(&job.spec.tenant) {
        Some(t) => format!(
            "tenant {} has used {:.1} of its {} GPU-hours in the last {}",
            t.name,
            t.window_gpu_hours(now),
            t.gpu_hours_quota.map(|q| format!("{q:.1}")).unwrap_or_else(|| "(per cloud)".into()),
            span(t.gpu_hours_window_ms / 1000)
        ),
        None => "its tenant's GPU-hours quota is used up".into(),
    }
}

fn reserved_text(at: Timestamp, now: Timestamp) -> String {
    if at == Timestamp::NEVER {
        "it holds the backfill reservation: GPUs are kept for it as they free up (no running job declares its end)"
            .into()
    } else {
        format!("it holds the backfill reservation: its GPUs are expected free in {}", span(at.since(now) / 1000))
    }
}

/// "needs 2 shards of 8 H100 GPUs (at least 80 GiB) each".
fn need_text(spec: &JobSpec, shards: u32) -> String {
    let r = &spec.resources;
    let mut kind = String::new();
    if let Some(m) = &r.gpu_model {
        kind.push_str(m);
        kind.push(' ');
    }
    let mut s = if shards == 1 {
        format!("needs {} {kind}GPU{} on one node", r.gpus, if r.gpus == 1 { "" } else { "s" })
    } else {
        format!("needs {shards} shards of {} {kind}GPU{} each", r.gpus, if r.gpus == 1 { "" } else { "s" })
    };
    if r.min_gpu_memory_mib > 0 {
        s.push_str(&format!(" (at least {} GiB each)", r.min_gpu_memory_mib / 1024));
    }
    s
}

/// "3h 20m", "45s".
fn span(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Jobs whose shards are stopping to make room for `id`.
fn stopping_for(state: &State, id: JobId) -> Vec<JobId> {
    let mut v: Vec<JobId> = state
        .live_attempts()
        .values()
        .filter_map(|r| {
            let j = state.job(r.job)?;
            match j.shards.get(r.shard as usize)?.state {
                ShardState::Stopping(StopReason::Preempted { by }) if by == id => Some(j.id),
                _ => None,
            }
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// (higher priority, same priority and considered first) pending jobs ahead of `job`.
fn ahead_count(state: &State, job: &Job, now: Timestamp) -> (usize, usize) {
    let share = |tenant: &str| match state.tenants().get(tenant) {
        Some(t) => {
            (t.usage_at(now, state.config().fair_share_half_life_ms) + t.gpus_in_use as f64)
                / f64::from(t.weight.max(1))
        }
        None => 0.0,
    };
    let mine = share(&job.spec.tenant);
    let mut shares: BTreeMap<&str, f64> = BTreeMap::new();
    let (mut higher, mut same) = (0, 0);
    for other in state.pending_jobs().iter().filter(|o| **o != job.id).filter_map(|o| state.job(*o)) {
        if other.cancel_requested {
            continue;
        }
        if other.spec.priority > job.spec.priority {
            higher += 1;
        } else if other.spec.priority == job.spec.priority {
            let t = other.spec.tenant.as_str();
            let theirs = *shares.entry(t).or_insert_with(|| share(t));
            let first = if t == job.spec.tenant { other.id < job.id } else { theirs < mine };
            same += usize::from(first);
        }
    }
    (higher, same)
}

/// When the first live attempt on a node the job could use declares its end (NEVER: none
/// declares one); None when no eligible node runs anything.
fn earliest_end(state: &State, spec: &JobSpec, now: Timestamp) -> Option<Timestamp> {
    let mut best: Option<Timestamp> = None;
    for r in state.live_attempts().values() {
        let Some(j) = state.job(r.job) else { continue };
        let Some(at) = j.shards.get(r.shard as usize).and_then(|s| s.attempt.as_ref()) else { continue };
        let Some(node) = state.nodes().get(&at.node) else { continue };
        if !node.schedulable() || !node_admits(spec, node) {
            continue;
        }
        let end = match (j.spec.max_runtime_secs, j.started_at) {
            (Some(s), Some(at)) => at.plus_secs(s).max(now),
            _ => Timestamp::NEVER,
        };
        best = Some(best.map_or(end, |b| b.min(end)));
    }
    best
}

/// The fleet walked through one job's constraints.
#[derive(Default)]
struct Funnel {
    registered: usize,
    ready: usize,
    drained: usize,
    down: usize,
    admitted: usize,
    /// Admitted nodes with enough healthy matching GPUs (and CPU and memory) for one shard.
    sized: usize,
    /// Of those, the ones with that much free now.
    free_nodes: usize,
    /// Shards the sized nodes could hold at once, every GPU free: in all, and in the best
    /// single group its span rules allow (one region, one cloud, or all).
    total_slots: u32,
    best_total: u32,
    /// The same, free now.
    free_slots: u32,
    best_free: u32,
    /// Shards free spot nodes alone could hold (for a job that avoids spot).
    spot_free: u32,
    /// Free matching GPUs on admitted nodes that cannot hold a whole shard.
    smaller_fits_now: u32,
    /// Most healthy matching GPUs on one admitted node, and the models admitted nodes have.
    largest: u32,
    models: Vec<String>,
    /// Admitted nodes short of CPU or host memory for one shard.
    short_of_host: usize,
}

impl Funnel {
    fn walk(state: &State, spec: &JobSpec) -> Funnel {
        let r = &spec.resources;
        let g = r.gpus.max(1);
        let mut f = Funnel::default();
        let mut groups: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
        let mut spot_spec = spec.clone();
        spot_spec.placement.spot = SpotPolicy::Allow;
        for node in state.nodes().values() {
            f.registered += 1;
            match node.state {
                NodeState::Ready => f.ready += 1,
                NodeState::Draining { .. } => f.drained += 1,
                NodeState::Down { .. } => f.down += 1,
            }
            if !node.schedulable() {
                continue;
            }
            let spot_only = !node_admits(spec, node) && node.info.spot && node_admits(&spot_spec, node);
            if !node_admits(spec, node) && !spot_only {
                continue;
            }
            let (healthy, free) = matching(spec, node);
            let host_slots = |cpu: u64, mem: u64| -> u32 {
                let by_cpu = cpu.checked_div(r.cpu_millis).unwrap_or(u64::MAX);
                let by_mem = mem.checked_div(r.memory_mib).unwrap_or(u64::MAX);
                by_cpu.min(by_mem).min(u64::from(u32::MAX)) as u32
            };
            let cap = (healthy / g).min(host_slots(node.info.cpu_millis, node.info.memory_mib));
            let now_free = (free / g).min(host_slots(
                node.info.cpu_millis.saturating_sub(node.cpu_used),
                node.info.memory_mib.saturating_sub(node.memory_used),
            ));
            if spot_only {
                f.spot_free += now_free;
                continue;
            }
            f.admitted += 1;
            f.largest = f.largest.max(healthy);
            for gpu in &node.gpus {
                if !f.models.contains(&gpu.model) {
                    f.models.push(gpu.model.clone());
                }
            }
            if healthy >= g && cap == 0 {
                f.short_of_host += 1;
            }
            if cap == 0 {
                continue;
            }
            f.sized += 1;
            f.total_slots += cap;
            f.free_slots += now_free;
            f.free_nodes += usize::from(now_free > 0);
            f.smaller_fits_now += free % g;
            let key = if spec.placement.span_clouds {
                (String::new(), String::new())
            } else if spec.placement.span_regions {
                (node.info.cloud.to_string(), String::new())
            } else {
                (node.info.cloud.to_string(), node.info.region.clone())
            };
            let e = groups.entry(key).or_default();
            e.0 += cap;
            e.1 += now_free;
        }
        f.best_total = groups.values().map(|g| g.0).max().unwrap_or(0);
        f.best_free = groups.values().map(|g| g.1).max().unwrap_or(0);
        f
    }

    fn steps(&self, spec: &JobSpec) -> Vec<Step> {
        let r = &spec.resources;
        let mut kind = format!("{} healthy GPU{}", r.gpus, if r.gpus == 1 { "" } else { "s" });
        if let Some(m) = &r.gpu_model {
            kind.push_str(&format!(" matching \"{m}\""));
        }
        if r.min_gpu_memory_mib > 0 {
            kind.push_str(&format!(" of at least {} GiB", r.min_gpu_memory_mib / 1024));
        }
        if r.cpu_millis > 0 || r.memory_mib > 0 {
            kind.push_str(" with the CPU and host memory asked for");
        }
        vec![
            Step { label: "registered".into(), nodes: self.registered },
            Step { label: "ready (not draining or down)".into(), nodes: self.ready },
            Step { label: format!("admitted by its placement rules ({})", rules(spec)), nodes: self.admitted },
            Step { label: format!("with {kind}"), nodes: self.sized },
            Step { label: "with that much free now".into(), nodes: self.free_nodes },
        ]
    }

    /// Why it could never be placed as specified, and what would change that.
    fn why_never(&self, spec: &JobSpec, want: u32, need: &str) -> (String, Vec<String>) {
        let r = &spec.resources;
        if self.registered == 0 {
            return (format!("{need}: no node has registered"), vec!["start agents on GPU hosts".into()]);
        }
        if self.ready == 0 {
            return (
                format!("{need}: no node is ready ({} draining, {} down)", self.drained, self.down),
                vec!["an operator undrains nodes (tessera node undrain), or failed hosts come back".into()],
            );
        }
        if self.admitted == 0 {
            return (
                format!("{need}: no ready node meets its placement rules ({})", rules(spec)),
                vec!["relax placement (clouds, regions, labels or spot), or add nodes that meet it".into()],
            );
        }
        if self.sized == 0 {
            let models = self.models.join(", ");
            if self.short_of_host > 0 && self.largest >= r.gpus {
                return (
                    format!("{need}: no admitted node has the CPU and host memory it asks for per shard"),
                    vec!["ask for less CPU or host memory per shard".into()],
                );
            }
            let mut remedies = Vec::new();
            if self.largest > 0 {
                remedies.push(format!("ask for at most {} GPUs per shard (and more shards)", self.largest));
            }
            if r.gpu_model.is_some() || r.min_gpu_memory_mib > 0 {
                remedies.push(format!("ask for a GPU model the admitted nodes have: {models}"));
            }
            return (
                format!(
                    "{need}: no admitted node has {} healthy matching GPUs (the most on one node is {}; models there: {models})",
                    r.gpus, self.largest
                ),
                remedies,
            );
        }
        let mut remedies = vec![format!("ask for at most {} shards", self.best_total)];
        if !spec.placement.span_clouds && self.total_slots >= want {
            remedies.insert(
                0,
                format!(
                    "allow its shards to span {} (placement.span_{} = true): the fleet holds {} such shards in all",
                    if spec.placement.span_regions { "clouds" } else { "regions" },
                    if spec.placement.span_regions { "clouds" } else { "regions" },
                    self.total_slots
                ),
            );
        }
        (
            format!(
                "{need}: the eligible nodes could hold at most {} such shards at once{}",
                self.best_total,
                if self.total_slots > self.best_total { " within one region or cloud" } else { "" }
            ),
            remedies,
        )
    }
}

/// Healthy GPUs on `node` that match the spec, and how many of those are free.
fn matching(spec: &JobSpec, node: &Node) -> (u32, u32) {
    let mut healthy = 0;
    let mut free = 0;
    for g in node.gpus.iter().filter(|g| g.healthy() && spec.gpu_matches(&g.model, g.memory_mib)) {
        healthy += 1;
        free += u32::from(g.holder.is_none());
    }
    (healthy, free)
}

/// "cloud aws; region us-east-1; label team=vision; on-demand only", or "none".
fn rules(spec: &JobSpec) -> String {
    let p = &spec.placement;
    let mut v = Vec::new();
    if !p.clouds.is_empty() {
        v.push(format!("cloud {}", p.clouds.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" or ")));
    }
    if !p.regions.is_empty() {
        v.push(format!("region {}", p.regions.join(" or ")));
    }
    for (k, val) in &p.labels {
        v.push(format!("label {k}={val}"));
    }
    match p.spot {
        SpotPolicy::Avoid => v.push("on-demand only".into()),
        SpotPolicy::Require => v.push("spot only".into()),
        SpotPolicy::Allow | SpotPolicy::Prefer => {}
    }
    if v.is_empty() { "none".into() } else { v.join("; ") }
}
