//! The placement planner: a pure function of the state and the time that returns a [`Plan`].
//! The leader proposes the plan through the log as [`crate::Command::ApplyPlan`]; apply re-checks
//! every placement against the state it meets and rejects what has gone stale (like Nomad's plan
//! applier), so a plan computed on a slightly old state is harmless.
//!
//! What it decides, in order:
//! 1. Queue order: priority (high first); within a priority, weighted fair share between tenants
//!    by decayed GPU-hours (plus the GPUs they hold now); then submission order. Tenants over
//!    their GPU quota wait. Tenants at their GPU-hours quota for the window wait too, checked
//!    once per tenant per round: over the all-clouds quota their jobs never enter the queue (so
//!    they take no reservation and preempt nothing); over one cloud's quota that cloud's nodes
//!    are left out of their jobs' eligible classes. Running work is not stopped.
//! 2. Gangs: all pending shards of a job are placed at once or not at all.
//! 3. Constraints: GPU count, model, memory, CPU, memory, clouds, regions, labels, spot policy;
//!    only ready nodes and healthy, free GPUs.
//! 4. Topology: one node, else one zone, else one region; several regions or clouds only when
//!    the spec allows.
//! 5. Packing: best fit (the node left with the fewest free GPUs), so whole nodes stay free for
//!    large gangs; then the lower price per GPU-hour; then the lower node id.
//! 6. Backfill (EASY): the first job that cannot start gets a reservation of the GPUs that free up
//!    earliest; later jobs may use those GPUs only if their declared runtime ends before it.
//! 7. Preemption: a job that cannot fit may displace jobs of strictly lower priority, choosing the
//!    victims that lose the least work since their last checkpoint; victims are requeued.
//!
//! Every iteration is over ordered maps or sorted vectors and ties break on node id, so the same
//! state and time always give the same plan.
//!
//! A round only takes capacity away as it goes, so once a job of some shape (resources,
//! placement rules, shard count, eligible node classes, whether it may backfill) finds no room,
//! no later job of that shape can either: the round tries each such shape once (Borg's
//! equivalence classes), and a deep queue of jobs that do not fit costs a lookup each.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::model::{Job, JobId, Node, NodeId, NodeInfo, ShardState, Timestamp};
use crate::placement::info_admits;
pub use crate::placement::{GangPlacement, Plan, Preemption, ShardPlacement, node_admits, span_ok};
use crate::spec::{Cloud, JobSpec, SpotPolicy};
use crate::state::State;

/// Why a job is still waiting after a planning round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReason {
    /// Its tenant would go over its GPU quota.
    Quota,
    /// Its tenant has used its GPU-hours quota of the window, overall or on every cloud the job
    /// could run on.
    GpuHoursQuota,
    /// A failed gang waits out its retry backoff.
    Backoff,
    /// No capacity fits now; it will start when GPUs free up.
    NoCapacity,
    /// It holds the backfill reservation, starting at the given time (NEVER: unknown).
    Reserved(Timestamp),
    /// Lower-priority jobs are stopping to make room for it.
    AwaitingPreemption,
    /// No node in the fleet could ever fit it as specified.
    Unschedulable,
    /// The plan's size limit was reached before it was considered.
    PlanFull,
}

/// The backfill reservation of a planning round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The job it protects.
    pub job: JobId,
    /// When its GPUs are expected free (NEVER when some holder has no declared runtime).
    pub start: Timestamp,
    /// Reserved GPUs, per node.
    pub gpus: BTreeMap<NodeId, Vec<u32>>,
}

/// A plan and what explains it; only the plan goes into the log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanOutput {
    /// The plan to propose.
    pub plan: Plan,
    /// The backfill reservation made, if any.
    pub reservation: Option<Reservation>,
    /// Jobs left waiting, and why.
    pub waiting: BTreeMap<JobId, WaitReason>,
}

/// Bounds on one planning round.
#[derive(Debug, Clone)]
pub struct PlanLimits {
    /// Most shards placed by one plan.
    pub max_shards: usize,
    /// Most jobs one plan tries to make room for by preemption.
    pub max_preemptions: usize,
    /// Most victim jobs examined for one preemption.
    pub max_victim_candidates: usize,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits { max_shards: 20_000, max_preemptions: 16, max_victim_candidates: 64 }
    }
}

/// Hours of future use charged for each GPU a tenant holds now, when ordering tenants.
const FAIR_SHARE_LOOKAHEAD_HOURS: f64 = 1.0;

// ---------------------------------------------------------------------------------------------
// Capacity view
// ---------------------------------------------------------------------------------------------

fn bits(mask: u64) -> impl Iterator<Item = u32> {
    (0..64u32).filter(move |i| mask & (1u64 << i) != 0)
}

fn lowest(mask: u64, n: u32) -> u64 {
    let mut out = 0;
    for i in bits(mask).take(n as usize) {
        out |= 1 << i;
    }
    out
}

struct NodeView<'a> {
    node: &'a Node,
    class: usize,
    /// Healthy GPUs no live attempt holds.
    free: u64,
    /// GPUs of the backfill reservation.
    reserved: u64,
    cpu_free: u64,
    mem_free: u64,
    /// Index key currently in the class index, if any.
    key: Option<(u32, u64, NodeId, usize)>,
}

struct Class<'a> {
    info: &'a NodeInfo,
    /// (model, memory) when every GPU of the class's nodes is alike.
    uniform: Option<(&'a str, u64)>,
    /// Nodes by (free unreserved GPUs, price, id, position).
    index: BTreeSet<(u32, u64, NodeId, usize)>,
}

struct Zone {
    classes: Vec<usize>,
}

struct View<'a> {
    nodes: Vec<NodeView<'a>>,
    pos: BTreeMap<NodeId, usize>,
    classes: Vec<Class<'a>>,
    zones: Vec<Zone>,
    /// Regions: (cloud index, zones).
    regions: Vec<(usize, Vec<usize>)>,
    /// Clouds: classes.
    clouds: Vec<Vec<usize>>,
    reserved_start: Option<Timestamp>,
    reserved_nodes: Vec<usize>,
}

/// Nodes alike for placement: same cloud, region, zone, spot kind, labels and GPU kind.
type ClassKey<'a> = (Cloud, &'a str, &'a str, bool, &'a BTreeMap<String, String>, Option<(&'a str, u64)>);

impl<'a> View<'a> {
    fn build(state: &'a State) -> View<'a> {
        let mut class_ids: BTreeMap<ClassKey<'a>, usize> = BTreeMap::new();
        let mut zone_ids: BTreeMap<(Cloud, &'a str, &'a str), usize> = BTreeMap::new();
        let mut region_ids: BTreeMap<(Cloud, &'a str), usize> = BTreeMap::new();
        let mut cloud_ids: BTreeMap<Cloud, usize> = BTreeMap::new();
        let mut v = View {
            nodes: Vec::with_capacity(state.nodes().len()),
            pos: BTreeMap::new(),
            classes: Vec::new(),
            zones: Vec::new(),
            regions: Vec::new(),
            clouds: Vec::new(),
            reserved_start: None,
            reserved_nodes: Vec::new(),
        };
        for node in state.nodes().values().filter(|n| n.schedulable() && !n.gpus.is_empty()) {
            let info = &node.info;
            let uniform = match node.gpus.split_first() {
                Some((first, rest))
                    if rest.iter().all(|g| g.model == first.model && g.memory_mib == first.memory_mib) =>
                {
                    Some((first.model.as_str(), first.memory_mib))
                }
                _ => None,
            };
            let cloud = *cloud_ids.entry(info.cloud).or_insert_with(|| {
                v.clouds.push(Vec::new());
                v.clouds.len() - 1
            });
            let region = *region_ids.entry((info.cloud, &info.region)).or_insert_with(|| {
                v.regions.push((cloud, Vec::new()));
                v.regions.len() - 1
            });
            let zone = *zone_ids.entry((info.cloud, &info.region, &info.zone)).or_insert_with(|| {
                v.zones.push(Zone { classes: Vec::new() });
                v.regions[region].1.push(v.zones.len() - 1);
                v.zones.len() - 1
            });
            let key = (info.cloud, info.region.as_str(), info.zone.as_str(), info.spot, &info.labels, uniform);
            let class = *class_ids.entry(key).or_insert_with(|| {
                v.classes.push(Class { info, uniform, index: BTreeSet::new() });
                v.zones[zone].classes.push(v.classes.len() - 1);
                v.clouds[cloud].push(v.classes.len() - 1);
                v.classes.len() - 1
            });
            let mut free = 0u64;
            for g in &node.gpus {
                if g.healthy() && g.holder.is_none() && g.index < 64 {
                    free |= 1 << g.index;
                }
            }
            let p = v.nodes.len();
            v.pos.insert(node.id, p);
            v.nodes.push(NodeView {
                node,
                class,
                free,
                reserved: 0,
                cpu_free: info.cpu_millis.saturating_sub(node.cpu_used),
                mem_free: info.memory_mib.saturating_sub(node.memory_used),
                key: None,
            });
            v.reindex(p);
        }
        v
    }

    fn reindex(&mut self, p: usize) {
        let n = &mut self.nodes[p];
        if let Some(k) = n.key.take() {
            self.classes[n.class].index.remove(&k);
        }
        let avail = (n.free & !n.reserved).count_ones();
        if avail > 0 {
            let k = (avail, n.node.info.price_micros_per_gpu_hour, n.node.id, p);
            self.classes[n.class].index.insert(k);
            n.key = Some(k);
        }
    }

    fn take(&mut self, p: usize, mask: u64, cpu: u64, mem: u64) {
        let n = &mut self.nodes[p];
        n.free &= !mask;
        n.cpu_free = n.cpu_free.saturating_sub(cpu);
        n.mem_free = n.mem_free.saturating_sub(mem);
        self.reindex(p);
    }

    fn give(&mut self, p: usize, mask: u64, cpu: u64, mem: u64) {
        let n = &mut self.nodes[p];
        n.free |= mask;
        n.cpu_free += cpu;
        n.mem_free += mem;
        self.reindex(p);
    }
}

// ---------------------------------------------------------------------------------------------
// One job's needs
// ---------------------------------------------------------------------------------------------

struct Need<'a> {
    spec: &'a JobSpec,
    shards: Vec<u32>,
    gpus: u32,
    cpu: u64,
    mem: u64,
    /// May use reserved GPUs: its declared runtime ends before the reservation starts.
    short: bool,
    /// Eligible classes, with 0 for the preferred spot kind and 1 for the other.
    classes: BTreeMap<usize, u8>,
    /// Where each pending shard's last attempt ran (node, GPU mask), in `shards` order: a
    /// restarting gang goes back there where it can (partial gang repair).
    prev: Vec<Option<(NodeId, u64)>>,
    /// Some class it could use was left out because its tenant's GPU-hours quota for that
    /// class's cloud is used up.
    quota_blocked: bool,
}

impl<'a> Need<'a> {
    /// `closed`: clouds its tenant may not use now (GPU-hours quota used up).
    fn new(job: &'a Job, view: &View<'_>, now: Timestamp, closed: &[Cloud]) -> Need<'a> {
        let spec = &job.spec;
        let pending: Vec<&crate::model::Shard> = job.shards.iter().filter(|s| s.state == ShardState::Pending).collect();
        let shards = pending.iter().map(|s| s.index).collect();
        let prev = pending
            .iter()
            .map(|s| {
                let a = s.attempt.as_ref()?;
                let mask = a.gpus.iter().try_fold(0u64, |m, g| (*g < 64).then(|| m | (1 << g)))?;
                Some((a.node, mask))
            })
            .collect();
        let short = match (view.reserved_start, spec.max_runtime_secs) {
            (Some(start), Some(rt)) => start != Timestamp::NEVER && now.plus_secs(rt) <= start,
            _ => false,
        };
        let mut classes = BTreeMap::new();
        let mut quota_blocked = false;
        for (i, c) in view.classes.iter().enumerate() {
            if !info_admits(spec, c.info) {
                continue;
            }
            if let Some((model, mem)) = c.uniform
                && !spec.gpu_matches(model, mem)
            {
                continue;
            }
            if closed.contains(&c.info.cloud) {
                quota_blocked = true;
                continue;
            }
            let rank = match spec.placement.spot {
                SpotPolicy::Prefer => u8::from(!c.info.spot),
                _ => 0,
            };
            classes.insert(i, rank);
        }
        Need {
            spec,
            shards,
            gpus: spec.resources.gpus,
            cpu: spec.resources.cpu_millis,
            mem: spec.resources.memory_mib,
            short,
            classes,
            prev,
            quota_blocked,
        }
    }

    /// GPUs of node `p` this job may use now.
    fn usable(&self, view: &View<'_>, p: usize) -> u64 {
        let n = &view.nodes[p];
        let mut mask = if self.short { n.free } else { n.free & !n.reserved };
        if view.classes[n.class].uniform.is_none() {
            for g in &n.node.gpus {
                if g.index < 64 && !self.spec.gpu_matches(&g.model, g.memory_mib) {
                    mask &= !(1 << g.index);
                }
            }
        }
        mask
    }
}

/// A candidate node for `k` shards: ordered so that the best is the least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Cand {
    spot_rank: u8,
    leftover: u32,
    price: u64,
    node: NodeId,
    pos: usize,
    mask: u64,
}

fn best_in_class(view: &View<'_>, need: &Need<'_>, class: usize, rank: u8, k: u32) -> Option<Cand> {
    let g = need.gpus * k;
    let fits = |p: usize| -> Option<Cand> {
        let n = &view.nodes[p];
        if (need.cpu > 0 && n.cpu_free < need.cpu * u64::from(k))
            || (need.mem > 0 && n.mem_free < need.mem * u64::from(k))
        {
            return None;
        }
        let usable = need.usable(view, p);
        let count = usable.count_ones();
        (count >= g).then(|| Cand {
            spot_rank: rank,
            leftover: count - g,
            price: n.node.info.price_micros_per_gpu_hour,
            node: n.node.id,
            pos: p,
            mask: lowest(usable, g),
        })
    };
    let mut best = view.classes[class].index.range((g, 0, NodeId(0), 0)..).find_map(|k| fits(k.3));
    if need.short {
        for &p in &view.reserved_nodes {
            if view.nodes[p].class == class
                && let Some(c) = fits(p)
            {
                best = Some(best.map_or(c, |b| b.min(c)));
            }
        }
    }
    best
}

fn best_over(view: &View<'_>, need: &Need<'_>, classes: &[usize], k: u32) -> Option<Cand> {
    classes.iter().filter_map(|c| need.classes.get(c).and_then(|r| best_in_class(view, need, *c, *r, k))).min()
}

/// Score of a gang placement: lower is better.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    spot_penalty: u32,
    nodes: usize,
    leftover: u64,
    price: u64,
    ids: Vec<NodeId>,
}

struct Taken {
    pos: usize,
    mask: u64,
    shards: u32,
}

/// Place `need.shards` greedily, best fit per shard, within `classes`. On success the GPUs stay
/// taken in the view and the placements are returned; on failure the view is unchanged.
fn greedy(view: &mut View<'_>, need: &Need<'_>, classes: &[usize]) -> Option<(Score, Vec<Taken>)> {
    let mut taken: Vec<Taken> = Vec::new();
    let mut score = Score { spot_penalty: 0, nodes: 0, leftover: 0, price: 0, ids: Vec::new() };
    for _ in &need.shards {
        let Some(c) = best_over(view, need, classes, 1) else {
            undo(view, need, &taken);
            return None;
        };
        view.take(c.pos, c.mask, need.cpu, need.mem);
        score.spot_penalty += u32::from(c.spot_rank);
        score.price += c.price * u64::from(need.gpus);
        match taken.iter_mut().find(|t| t.pos == c.pos) {
            Some(t) => {
                t.mask |= c.mask;
                t.shards += 1;
            }
            None => taken.push(Taken { pos: c.pos, mask: c.mask, shards: 1 }),
        }
    }
    score.nodes = taken.len();
    for t in &taken {
        score.leftover += u64::from(need.usable(view, t.pos).count_ones());
        score.ids.push(view.nodes[t.pos].node.id);
    }
    score.ids.sort();
    Some((score, taken))
}

fn undo(view: &mut View<'_>, need: &Need<'_>, taken: &[Taken]) {
    for t in taken {
        view.give(t.pos, t.mask, need.cpu * u64::from(t.shards), need.mem * u64::from(t.shards));
    }
}

/// Partial gang repair: a restarting gang goes back to the nodes and GPUs it had, and only the
/// shards whose node or GPUs are no longer usable (down, draining, unhealthy, taken) move,
/// best fit, nearest the others first. None when no shard can go back, or the result would
/// break the spec's topology; then the gang is placed afresh. Leaves the result taken.
fn repair(view: &mut View<'_>, need: &Need<'_>) -> Option<Vec<Taken>> {
    if need.prev.iter().all(Option::is_none) {
        return None;
    }
    let mut slots: Vec<Option<Taken>> = Vec::with_capacity(need.shards.len());
    for prev in &need.prev {
        let back = prev.and_then(|(node, mask)| {
            let p = *view.pos.get(&node)?;
            let n = &view.nodes[p];
            let ok = need.classes.contains_key(&n.class)
                && need.usable(view, p) & mask == mask
                && mask.count_ones() == need.gpus
                && (need.cpu == 0 || n.cpu_free >= need.cpu)
                && (need.mem == 0 || n.mem_free >= need.mem);
            ok.then_some((p, mask))
        });
        slots.push(back.map(|(pos, mask)| {
            view.take(pos, mask, need.cpu, need.mem);
            Taken { pos, mask, shards: 1 }
        }));
    }
    // Nothing taken when no shard could go back: place the gang afresh.
    let anchor = slots.iter().flatten().next().map(|t| view.nodes[t.pos].class)?;
    // Those that move: the anchor's zone, then its region, then anywhere eligible.
    let zone: Vec<usize> =
        view.zones.iter().find(|z| z.classes.contains(&anchor)).map_or(Vec::new(), |z| z.classes.clone());
    let region: Vec<usize> = view
        .regions
        .iter()
        .find(|(_, zs)| zs.iter().any(|z| view.zones[*z].classes.contains(&anchor)))
        .map_or(Vec::new(), |(_, zs)| zs.iter().flat_map(|z| view.zones[*z].classes.iter().copied()).collect());
    let all: Vec<usize> = need.classes.keys().copied().collect();
    let mut failed = false;
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        let c = [&zone, &region, &all].into_iter().find_map(|d| best_over(view, need, d, 1));
        match c {
            Some(c) => {
                view.take(c.pos, c.mask, need.cpu, need.mem);
                *slot = Some(Taken { pos: c.pos, mask: c.mask, shards: 1 });
            }
            None => {
                failed = true;
                break;
            }
        }
    }
    let taken: Vec<Taken> = slots.into_iter().flatten().collect();
    if failed || !span_ok(need.spec, taken.iter().map(|t| &view.nodes[t.pos].node.info)) {
        undo(view, need, &taken);
        return None;
    }
    Some(taken)
}

/// Find the best gang placement by topology level; leaves it taken in the view.
fn place(view: &mut View<'_>, need: &Need<'_>) -> Option<Vec<Taken>> {
    if need.shards.is_empty() || need.classes.is_empty() {
        return None;
    }
    if let Some(t) = repair(view, need) {
        return Some(t);
    }
    let k = need.shards.len() as u32;
    let all: Vec<usize> = need.classes.keys().copied().collect();
    // Level 0: the whole gang on one node.
    if let Some(c) = best_over(view, need, &all, k) {
        view.take(c.pos, c.mask, need.cpu * u64::from(k), need.mem * u64::from(k));
        return Some(vec![Taken { pos: c.pos, mask: c.mask, shards: k }]);
    }
    if k == 1 {
        return None;
    }
    // Levels 1..4: one zone, one region, one cloud (span_regions), anywhere (span_clouds).
    let p = &need.spec.placement;
    let zone_domains: Vec<Vec<usize>> = view.zones.iter().map(|z| z.classes.clone()).collect();
    let region_domains: Vec<Vec<usize>> = view
        .regions
        .iter()
        .map(|(_, zs)| zs.iter().flat_map(|z| view.zones[*z].classes.iter().copied()).collect())
        .collect();
    let mut levels = vec![zone_domains, region_domains];
    if p.span_regions || p.span_clouds {
        levels.push(view.clouds.clone());
    }
    if p.span_clouds {
        levels.push(vec![all]);
    }
    for domains in levels {
        let mut best: Option<(Score, usize)> = None;
        for (i, d) in domains.iter().enumerate() {
            let d: Vec<usize> = d.iter().copied().filter(|c| need.classes.contains_key(c)).collect();
            if d.is_empty() {
                continue;
            }
            if let Some((score, taken)) = greedy(view, need, &d) {
                undo(view, need, &taken);
                if best.as_ref().is_none_or(|(b, _)| score < *b) {
                    best = Some((score, i));
                }
            }
        }
        if let Some((_, i)) = best {
            let d: Vec<usize> = domains[i].iter().copied().filter(|c| need.classes.contains_key(c)).collect();
            return greedy(view, need, &d).map(|(_, t)| t);
        }
    }
    None
}

/// What decides whether a fresh gang fits: two jobs of the same shape fit or not alike.
#[derive(PartialEq, Eq, Hash)]
struct Shape<'a> {
    resources: &'a crate::spec::Resources,
    placement: &'a crate::spec::Placement,
    shards: usize,
    short: bool,
    classes: Vec<(usize, u8)>,
}

impl<'a> Shape<'a> {
    /// None for a gang going back to its last GPUs (partial repair): where it fits depends on
    /// where it ran.
    fn of(need: &Need<'a>) -> Option<Shape<'a>> {
        need.prev.iter().all(Option::is_none).then(|| Shape {
            resources: &need.spec.resources,
            placement: &need.spec.placement,
            shards: need.shards.len(),
            short: need.short,
            classes: need.classes.iter().map(|(c, r)| (*c, *r)).collect(),
        })
    }
}

/// [`place`], unless a job of the same shape already found no room this round.
fn place_shape<'a>(view: &mut View<'_>, need: &Need<'a>, no_room: &mut HashSet<Shape<'a>>) -> Option<Vec<Taken>> {
    let shape = Shape::of(need);
    if shape.as_ref().is_some_and(|s| no_room.contains(s)) {
        return None;
    }
    let taken = place(view, need);
    if taken.is_none()
        && let Some(s) = shape
    {
        no_room.insert(s);
    }
    taken
}

fn to_placement(view: &View<'_>, need: &Need<'_>, job: JobId, taken: &[Taken]) -> GangPlacement {
    let mut shards = Vec::with_capacity(need.shards.len());
    let mut idx = need.shards.iter();
    for t in taken {
        let mut gpus = bits(t.mask);
        for _ in 0..t.shards {
            let Some(&shard) = idx.next() else { break };
            let g: Vec<u32> = gpus.by_ref().take(need.gpus as usize).collect();
            shards.push(ShardPlacement { shard, node: view.nodes[t.pos].node.id, gpus: g });
        }
    }
    GangPlacement { job, shards }
}

// ---------------------------------------------------------------------------------------------
// Victims and reservations
// ---------------------------------------------------------------------------------------------

/// What a running job would give back if stopped: (node position, GPU mask, cpu, memory).
struct Held {
    parts: Vec<(usize, u64, u64, u64)>,
}

fn held_by_shard(view: &View<'_>, job: &Job, shard: &crate::model::Shard) -> Option<(usize, u64, u64, u64)> {
    let a = shard.attempt.as_ref()?;
    let p = *view.pos.get(&a.node)?;
    let mask = a.gpus.iter().filter(|g| **g < 64).fold(0u64, |m, g| m | (1 << g));
    Some((p, mask, job.spec.resources.cpu_millis, job.spec.resources.memory_mib))
}

/// GPUs of the job's assigned and running (not stopping) shards.
fn held_by(view: &View<'_>, job: &Job) -> Held {
    let parts = job
        .shards
        .iter()
        .filter(|s| matches!(s.state, ShardState::Assigned | ShardState::Running))
        .filter_map(|s| held_by_shard(view, job, s))
        .collect();
    Held { parts }
}

fn release(view: &mut View<'_>, h: &Held) {
    for &(p, mask, cpu, mem) in &h.parts {
        // Only healthy GPUs become usable again.
        let healthy = view.nodes[p]
            .node
            .gpus
            .iter()
            .filter(|g| g.healthy() && g.index < 64)
            .fold(0u64, |m, g| m | (1 << g.index));
        view.give(p, mask & healthy, cpu, mem);
    }
}

fn rehold(view: &mut View<'_>, h: &Held) {
    for &(p, mask, cpu, mem) in &h.parts {
        view.take(p, mask, cpu, mem);
    }
}

/// Would the gang fit? Leaves the view unchanged.
fn fits(view: &mut View<'_>, need: &Need<'_>) -> bool {
    match place(view, need) {
        Some(t) => {
            undo(view, need, &t);
            true
        }
        None => false,
    }
}

/// GPU-milliseconds of work a running job loses if stopped now.
fn lost_work(job: &Job, now: Timestamp) -> u64 {
    job.shards
        .iter()
        .filter(|s| s.state.is_live())
        .filter_map(|s| {
            let a = s.attempt.as_ref()?;
            let since = a.started_at.unwrap_or(a.assigned_at).max(s.checkpoint.as_ref().map_or(Timestamp(0), |c| c.at));
            Some(now.since(since).saturating_mul(u64::from(job.spec.resources.gpus)))
        })
        .sum()
}

fn choose_victims(
    state: &State,
    view: &mut View<'_>,
    need: &Need<'_>,
    now: Timestamp,
    running: &[(u16, JobId)],
    claimed: &BTreeSet<JobId>,
    limits: &PlanLimits,
) -> Option<Vec<JobId>> {
    let prio = need.spec.priority;
    let mut cands: Vec<(u64, u16, JobId, Held)> = Vec::new();
    for &(_, id) in running.iter().take_while(|(p, _)| *p < prio) {
        let Some(job) = state.job(id).filter(|_| !claimed.contains(&id)) else { continue };
        let held = held_by(view, job);
        // Only victims on nodes this job could use are worth stopping.
        if held.parts.iter().any(|(p, ..)| need.classes.contains_key(&view.nodes[*p].class)) {
            cands.push((lost_work(job, now), job.spec.priority, job.id, held));
        }
    }
    cands.sort_by_key(|a| (a.0, a.1, a.2));
    cands.truncate(limits.max_victim_candidates);
    let mut used = 0;
    let mut ok = false;
    for c in &cands {
        release(view, &c.3);
        used += 1;
        if fits(view, need) {
            ok = true;
            break;
        }
    }
    if !ok {
        for c in &cands[..used] {
            rehold(view, &c.3);
        }
        return None;
    }
    // Drop victims that turned out not to be needed, most costly first.
    let mut keep = vec![true; used];
    for i in (0..used).rev() {
        rehold(view, &cands[i].3);
        if fits(view, need) {
            keep[i] = false;
        } else {
            release(view, &cands[i].3);
        }
    }
    for (i, c) in cands[..used].iter().enumerate() {
        if keep[i] {
            rehold(view, &c.3);
        }
    }
    let mut victims: Vec<JobId> = cands[..used].iter().zip(&keep).filter(|(_, k)| **k).map(|(c, _)| c.2).collect();
    victims.sort();
    Some(victims)
}

/// EASY backfill: reserve for `need` the GPUs that free up earliest. Returns the start time.
fn reserve(state: &State, view: &mut View<'_>, need: &Need<'_>, job: JobId, now: Timestamp) -> Option<Reservation> {
    // When does each live job give its GPUs back?
    let mut ends: Vec<(Timestamp, Held)> = Vec::new();
    let mut seen = BTreeSet::new();
    for r in state.live_attempts().values() {
        if !seen.insert(r.job) {
            continue;
        }
        let Some(j) = state.job(r.job) else { continue };
        let stopping = j.shards.iter().any(|s| matches!(s.state, ShardState::Stopping(_)));
        for s in j.shards.iter().filter(|s| s.state.is_live()) {
            let Some(a) = &s.attempt else { continue };
            let end = if stopping {
                now
            } else {
                j.spec.max_runtime_secs.map_or(Timestamp::NEVER, |rt| a.assigned_at.plus_secs(rt).max(now))
            };
            ends.push((end, Held { parts: held_by_shard(view, j, s).into_iter().collect() }));
        }
    }
    ends.sort_by_key(|e| e.0);
    let times: Vec<Timestamp> = {
        let mut t: Vec<Timestamp> = ends.iter().map(|e| e.0).collect();
        t.dedup();
        t
    };
    let fits_at = |view: &mut View<'_>, t: Timestamp| -> bool {
        let upto = ends.partition_point(|e| e.0 <= t);
        for e in &ends[..upto] {
            release(view, &e.1);
        }
        let ok = fits(view, need);
        for e in &ends[..upto] {
            rehold(view, &e.1);
        }
        ok
    };
    // Fitting is monotonic in time (more GPUs free later): binary search the earliest time.
    let (mut lo, mut hi) = (0usize, times.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits_at(view, times[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let start = *times.get(lo)?;
    let upto = ends.partition_point(|e| e.0 <= start);
    for e in &ends[..upto] {
        release(view, &e.1);
    }
    let taken = place(view, need);
    if let Some(t) = &taken {
        undo(view, need, t);
    }
    for e in &ends[..upto] {
        rehold(view, &e.1);
    }
    let taken = taken?;
    let mut gpus = BTreeMap::new();
    for t in &taken {
        view.nodes[t.pos].reserved |= t.mask;
        view.reindex(t.pos);
        view.reserved_nodes.push(t.pos);
        gpus.insert(view.nodes[t.pos].node.id, bits(t.mask).collect());
    }
    view.reserved_start = Some(start);
    Some(Reservation { job, start, gpus })
}

// ---------------------------------------------------------------------------------------------
// Queue order
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);

impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn share(state: &State, tenant: &str, extra_gpus: u64, now: Timestamp) -> Share {
    let hl = state.config().fair_share_half_life_ms;
    match state.tenants().get(tenant) {
        Some(t) => Share(
            (t.usage_at(now, hl) + (t.gpus_in_use + extra_gpus) as f64 * FAIR_SHARE_LOOKAHEAD_HOURS)
                / f64::from(t.weight.max(1)),
        ),
        None => Share(extra_gpus as f64 * FAIR_SHARE_LOOKAHEAD_HOURS),
    }
}

// ---------------------------------------------------------------------------------------------
// The planner
// ---------------------------------------------------------------------------------------------

/// Plan placements and preemptions for the state at time `now`.
pub fn plan(state: &State, now: Timestamp, limits: &PlanLimits) -> PlanOutput {
    let mut out = PlanOutput::default();
    // Nothing waits: nothing to place, preempt or reserve for. The leader plans on every
    // change and every tick, and a fleet at rest (10,000 nodes heartbeating, no queue) would
    // otherwise build its whole view each time.
    if state.pending_jobs().is_empty() {
        return out;
    }
    let mut view = View::build(state);

    // Jobs already waiting for their victims to stop.
    let mut awaiting: BTreeSet<JobId> = BTreeSet::new();
    for r in state.live_attempts().values() {
        if let Some((_, shard)) = state.job(r.job).map(|j| (j, &j.shards[r.shard as usize]))
            && let ShardState::Stopping(crate::model::StopReason::Preempted { by }) = shard.state
        {
            awaiting.insert(by);
        }
    }

    // Jobs with running shards, lowest priority first: the possible victims.
    let mut running: Vec<(u16, JobId)> = Vec::new();
    let mut last = None;
    for r in state.live_attempts().values() {
        if last != Some(r.job)
            && let Some(j) = state.job(r.job)
        {
            running.push((j.spec.priority, j.id));
        }
        last = Some(r.job);
    }
    running.sort();
    running.dedup();

    // Nothing can start when no GPU is free and no running job could be preempted by any
    // waiting one: skip the queue walk (the common case of a full fleet under load). Wait
    // reasons are then left out: they are advice, not state.
    let free_gpus: u32 = view.nodes.iter().map(|n| n.free.count_ones()).sum();
    if free_gpus == 0 {
        let lowest_running = running.first().map(|(p, _)| *p);
        let can_preempt = lowest_running.is_some_and(|low| {
            state.pending_jobs().iter().filter_map(|id| state.job(*id)).any(|j| j.spec.priority > low)
        });
        if !can_preempt {
            return out;
        }
    }

    // GPU-hours quotas, judged once per tenant with pending jobs: None when the tenant may not
    // be placed at all, else the clouds it may not use.
    let mut gates: BTreeMap<&str, Option<Vec<Cloud>>> = BTreeMap::new();

    // Queue: priority, then tenants by fair share, then job id.
    let mut levels: BTreeMap<Reverse<u16>, BTreeMap<&str, VecDeque<&Job>>> = BTreeMap::new();
    for id in state.pending_jobs() {
        let Some(job) = state.job(*id) else { continue };
        if job.cancel_requested || job.shards.iter().any(|s| s.state.is_live()) {
            continue;
        }
        if job.shards.iter().any(|s| s.state == ShardState::Pending && s.not_before > now) {
            out.waiting.insert(job.id, WaitReason::Backoff);
            continue;
        }
        let tenant = job.spec.tenant.as_str();
        let gate = gates.entry(tenant).or_insert_with(|| match state.tenants().get(tenant) {
            Some(t) if t.gpu_hours_exhausted(now) => None,
            Some(t) => Some(t.gpu_hours_exhausted_clouds(now)),
            None => Some(Vec::new()),
        });
        if gate.is_none() {
            out.waiting.insert(job.id, WaitReason::GpuHoursQuota);
            continue;
        }
        levels
            .entry(Reverse(job.spec.priority))
            .or_default()
            .entry(job.spec.tenant.as_str())
            .or_default()
            .push_back(job);
    }

    let mut planned_gpus: BTreeMap<&str, u64> = BTreeMap::new();
    let mut claimed: BTreeSet<JobId> = BTreeSet::new();
    let mut preempt_tries = 0usize;
    let mut shards_planned = 0usize;
    let mut no_room: HashSet<Shape<'_>> = HashSet::new();
    // Shapes no set of nodes could ever hold: judged once per round, not once per job (a deep
    // queue of identical jobs, like an array's waiting elements, would otherwise walk every live
    // attempt for each).
    let mut never: HashSet<Shape<'_>> = HashSet::new();
    // Arrays whose next fresh element could not be placed this round, and why: their later fresh
    // elements are the same job in all but the index, so they wait for the same reason without
    // being judged one by one (an array keeps up to `ARRAY_WINDOW` elements waiting).
    let mut blocked: BTreeMap<JobId, WaitReason> = BTreeMap::new();
    for (_, mut tenants) in levels {
        let mut heap: BinaryHeap<Reverse<(Share, &str)>> = tenants
            .keys()
            .map(|t| Reverse((share(state, t, planned_gpus.get(t).copied().unwrap_or(0), now), *t)))
            .collect();
        while let Some(Reverse((_, tenant))) = heap.pop() {
            let Some(queue) = tenants.get_mut(tenant) else { continue };
            let Some(job) = queue.pop_front() else { continue };
            let more = !queue.is_empty();
            let fresh_element = job.element_of.filter(|_| job.shards.iter().all(|s| s.attempt.is_none()));
            if let Some(why) = fresh_element.and_then(|e| blocked.get(&e.array)) {
                out.waiting.insert(job.id, why.clone());
                if more {
                    heap.push(Reverse((
                        share(state, tenant, planned_gpus.get(tenant).copied().unwrap_or(0), now),
                        tenant,
                    )));
                }
                continue;
            }
            let closed = gates.get(tenant).and_then(Option::as_deref).unwrap_or_default();
            let need = Need::new(job, &view, now, closed);
            let total = job.spec.total_gpus();
            if shards_planned + need.shards.len() > limits.max_shards {
                out.waiting.insert(job.id, WaitReason::PlanFull);
            } else if need.classes.is_empty() && need.quota_blocked {
                out.waiting.insert(job.id, WaitReason::GpuHoursQuota);
            } else if state.tenants().get(tenant).is_some_and(|t| {
                t.gpu_quota.is_some_and(|q| t.gpus_in_use + planned_gpus.get(tenant).copied().unwrap_or(0) + total > q)
            }) {
                out.waiting.insert(job.id, WaitReason::Quota);
            } else if let Some(taken) = place_shape(&mut view, &need, &mut no_room) {
                shards_planned += need.shards.len();
                *planned_gpus.entry(tenant).or_default() += total;
                out.plan.placements.push(to_placement(&view, &need, job.id, &taken));
            } else if awaiting.contains(&job.id) {
                out.waiting.insert(job.id, WaitReason::AwaitingPreemption);
            } else if let Some(victims) = (preempt_tries < limits.max_preemptions
                && running.first().is_some_and(|(p, _)| *p < job.spec.priority))
            .then(|| {
                preempt_tries += 1;
                choose_victims(state, &mut view, &need, now, &running, &claimed, limits)
            })
            .flatten()
            {
                claimed.extend(victims.iter().copied());
                // The victims' GPUs are spoken for: nobody else plans on them this round.
                for v in &victims {
                    if let Some(vj) = state.job(*v) {
                        let h = held_by(&view, vj);
                        for &(p, mask, ..) in &h.parts {
                            view.nodes[p].reserved |= mask;
                            view.reindex(p);
                        }
                    }
                }
                out.plan.preemptions.push(Preemption { job: job.id, victims });
                out.waiting.insert(job.id, WaitReason::AwaitingPreemption);
            } else if out.reservation.is_none() {
                let shape = Shape::of(&need);
                if shape.as_ref().is_some_and(|s| never.contains(s)) {
                    out.waiting.insert(job.id, WaitReason::Unschedulable);
                } else {
                    match reserve(state, &mut view, &need, job.id, now) {
                        Some(r) => {
                            out.waiting.insert(job.id, WaitReason::Reserved(r.start));
                            out.reservation = Some(r);
                        }
                        None => {
                            out.waiting.insert(job.id, WaitReason::Unschedulable);
                            never.extend(shape);
                        }
                    }
                }
            } else {
                out.waiting.insert(job.id, WaitReason::NoCapacity);
            }
            if let Some(e) = fresh_element
                && let Some(
                    why @ (WaitReason::Unschedulable
                    | WaitReason::NoCapacity
                    | WaitReason::Quota
                    | WaitReason::GpuHoursQuota
                    | WaitReason::PlanFull),
                ) = out.waiting.get(&job.id)
            {
                blocked.insert(e.array, why.clone());
            }
            if more {
                heap.push(Reverse((share(state, tenant, planned_gpus.get(tenant).copied().unwrap_or(0), now), tenant)));
            }
        }
    }
    out
}
