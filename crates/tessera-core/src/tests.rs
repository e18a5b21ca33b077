//! Tests of the state machine and the planner, and property tests over random command
//! sequences. Tenant limits (priority cap and default, GPU-hours quotas, write modes) are
//! tested in [`tenants`].

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::command::{ApplyContext, Command, Event, ExitStatus, Rejection, TenantWrite};
use crate::model::{
    DEFAULT_GPU_HOURS_WINDOW_MS, DrainReason, GpuInfo, JobState, NodeInfo, NodeState, ShardState, StopReason,
};
use crate::planner::{PlanLimits, PlanOutput, WaitReason, node_admits, plan, span_ok};
use crate::spec::{Cloud, JobSpec, SpotPolicy};
use crate::state::ARRAY_WINDOW;
use crate::{AttemptId, JobId, NodeId, State, Timestamp};

mod arrays;
mod gpu_faults;
mod limits;
mod tenants;
mod timeline;
mod usage;
mod why;

const HOUR: u64 = 3_600_000;

/// A state with a log: every command gets the next index and the current time.
struct Sim {
    state: State,
    index: u64,
    now: u64,
    log: Vec<(Command, ApplyContext)>,
}

fn ok(code: i32) -> ExitStatus {
    ExitStatus { code: Some(code), signal: None }
}

struct NodeSpec {
    name: &'static str,
    cloud: Cloud,
    region: &'static str,
    zone: &'static str,
    gpus: u32,
    model: &'static str,
    mem_gib: u64,
    spot: bool,
    price: u64,
}

fn n(name: &'static str) -> NodeSpec {
    NodeSpec {
        name,
        cloud: Cloud::Aws,
        region: "us-east-1",
        zone: "us-east-1a",
        gpus: 8,
        model: "NVIDIA H100 80GB HBM3",
        mem_gib: 80,
        spot: false,
        price: 4_000_000,
    }
}

fn info(s: &NodeSpec) -> NodeInfo {
    NodeInfo {
        name: s.name.into(),
        cloud: s.cloud,
        region: s.region.into(),
        zone: s.zone.into(),
        instance_type: "p5.48xlarge".into(),
        spot: s.spot,
        price_micros_per_gpu_hour: s.price,
        cpu_millis: 192_000,
        memory_mib: 2_000_000,
        gpus: (0..s.gpus)
            .map(|i| GpuInfo {
                uuid: format!("GPU-{}-{i}", s.name),
                model: s.model.into(),
                memory_mib: s.mem_gib * 1024,
            })
            .collect(),
        labels: BTreeMap::new(),
        agent_version: "test".into(),
        simulated: true,
        rendezvous_ports: None,
    }
}

fn spec(shards: u32, gpus: u32) -> JobSpec {
    JobSpec::new(vec!["train".into()], shards, gpus)
}

/// A submission with a priority the user gave and no recorded submitter.
fn submit_cmd(spec: JobSpec, idempotency_key: Option<String>) -> Command {
    Command::SubmitJob { spec, idempotency_key, priority_defaulted: false, submitted_by: None }
}

/// An upsert of a tenant's weight and GPU quota, with no other limits.
fn tenant_cmd(name: &str, weight: u32, gpu_quota: Option<u64>) -> Command {
    Command::SetTenant {
        name: name.into(),
        weight,
        gpu_quota,
        max_priority: None,
        default_priority: None,
        gpu_hours_quota: None,
        cloud_gpu_hours_quota: BTreeMap::new(),
        gpu_hours_window_ms: DEFAULT_GPU_HOURS_WINDOW_MS,
        mode: TenantWrite::Upsert,
    }
}

impl Sim {
    fn new() -> Sim {
        Sim { state: State::new(), index: 0, now: 1_000_000, log: Vec::new() }
    }
    fn apply(&mut self, cmd: Command) -> Result<Vec<Event>, Rejection> {
        self.index += 1;
        let ctx = ApplyContext { index: self.index, now: Timestamp(self.now) };
        self.log.push((cmd.clone(), ctx));
        self.state.apply(cmd, ctx)
    }
    fn node(&mut self, s: NodeSpec) -> NodeId {
        self.node_info(info(&s))
    }
    fn node_info(&mut self, i: NodeInfo) -> NodeId {
        for e in self.apply(Command::RegisterNode { info: i }).unwrap() {
            if let Event::NodeRegistered { node, .. } = e {
                return node;
            }
        }
        panic!("no NodeRegistered event");
    }
    fn submit(&mut self, spec: JobSpec) -> JobId {
        match self.apply(submit_cmd(spec, None)).unwrap()[..] {
            [Event::JobSubmitted { job, .. }] => job,
            ref other => panic!("unexpected events {other:?}"),
        }
    }
    /// Plan and apply the plan; return the planner's output and the events.
    fn round(&mut self) -> (PlanOutput, Vec<Event>) {
        let out = plan(&self.state, Timestamp(self.now), &PlanLimits::default());
        let ev = self.apply(Command::ApplyPlan { plan: out.plan.clone() }).unwrap();
        (out, ev)
    }
    fn job_state(&self, j: JobId) -> JobState {
        self.state.job(j).unwrap().state
    }
    fn shard_state(&self, j: JobId, s: u32) -> ShardState {
        self.state.job(j).unwrap().shards[s as usize].state
    }
    fn nodes_of(&self, j: JobId) -> Vec<NodeId> {
        self.state.job(j).unwrap().shards.iter().filter_map(|s| s.attempt.as_ref().map(|a| a.node)).collect()
    }
    fn attempt(&self, j: JobId, s: u32) -> AttemptId {
        self.state.job(j).unwrap().shards[s as usize].attempt.as_ref().unwrap().id
    }
    fn exit(&mut self, j: JobId, s: u32, code: i32) -> Result<Vec<Event>, Rejection> {
        let attempt = self.attempt(j, s);
        self.apply(Command::ShardExited { attempt, exit: ok(code), node_fault: false, message: None })
    }
    /// The attempt's process was killed by `signal` (its stop ladder's, or someone's).
    fn killed(&mut self, attempt: AttemptId, signal: i32) -> Vec<Event> {
        let exit = ExitStatus { code: None, signal: Some(signal) };
        self.apply(Command::ShardExited { attempt, exit, node_fault: false, message: None }).unwrap()
    }
    fn start_all(&mut self, j: JobId) {
        let n = self.state.job(j).unwrap().shards.len() as u32;
        for s in 0..n {
            let attempt = self.attempt(j, s);
            self.apply(Command::ShardStarted { attempt }).unwrap();
        }
    }
}

// ----- state machine -------------------------------------------------------------------------

#[test]
fn submit_validates_the_spec_and_assigns_ids_in_order() {
    let mut sim = Sim::new();
    assert_eq!(sim.submit(spec(1, 1)), JobId(1));
    assert_eq!(sim.submit(spec(1, 1)), JobId(2));
    let err = sim.apply(submit_cmd(spec(0, 1), None)).unwrap_err();
    assert!(matches!(&err, Rejection::InvalidSpec(e) if e.errors[0].field == "shards"), "{err}");
    assert_eq!(sim.state.jobs().len(), 2, "a rejected submission changes nothing");
}

#[test]
fn idempotency_keys_make_retried_submissions_safe() {
    let mut sim = Sim::new();
    let submit = |sim: &mut Sim, tenant: &str, key: &str| {
        let mut s = spec(1, 1);
        s.tenant = tenant.into();
        sim.apply(submit_cmd(s, Some(key.into()))).unwrap()
    };
    assert_eq!(submit(&mut sim, "a", "k1"), vec![Event::JobSubmitted { job: JobId(1), deduplicated: false }]);
    assert_eq!(submit(&mut sim, "a", "k1"), vec![Event::JobSubmitted { job: JobId(1), deduplicated: true }]);
    assert_eq!(submit(&mut sim, "b", "k1"), vec![Event::JobSubmitted { job: JobId(2), deduplicated: false }]);
    assert_eq!(sim.state.jobs().len(), 2);
    let long = "x".repeat(200);
    assert!(matches!(
        sim.apply(submit_cmd(spec(1, 1), Some(long))),
        Err(Rejection::InvalidArgument { field: "idempotency_key", .. })
    ));
    let restored = State::restore(&sim.state.snapshot()).unwrap();
    assert_eq!(restored, sim.state, "keys survive a snapshot");
}

#[test]
fn a_job_runs_to_success() {
    let mut sim = Sim::new();
    let node = sim.node(n("a"));
    let j = sim.submit(spec(2, 4));
    let (_, ev) = sim.round();
    let assigned: Vec<_> = ev.iter().filter(|e| matches!(e, Event::ShardAssigned { .. })).collect();
    assert_eq!(assigned.len(), 2);
    assert_eq!(sim.nodes_of(j), vec![node, node], "a 2x4 gang fits one node and prefers it");
    let gpus: Vec<Vec<u32>> =
        sim.state.job(j).unwrap().shards.iter().map(|s| s.attempt.clone().unwrap().gpus).collect();
    assert_eq!(gpus, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    assert_eq!(sim.job_state(j), JobState::Running);
    sim.start_all(j);
    assert_eq!(sim.shard_state(j, 0), ShardState::Running);
    sim.exit(j, 0, 0).unwrap();
    assert_eq!(sim.job_state(j), JobState::Running);
    sim.exit(j, 1, 0).unwrap();
    assert_eq!(sim.job_state(j), JobState::Succeeded);
    assert!(sim.state.node(node).unwrap().gpus.iter().all(|g| g.holder.is_none()));
    assert_eq!(sim.state.tenants()["default"].gpus_in_use, 0);
}

#[test]
fn stale_attempts_are_fenced() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    sim.node(n("b"));
    let j = sim.submit(spec(1, 8));
    sim.round();
    let first = sim.attempt(j, 0);
    assert_eq!(sim.nodes_of(j), vec![a]);
    sim.apply(Command::MarkNodeDown { node: a, reason: "stream broke".into(), registration: None }).unwrap();
    assert_eq!(sim.shard_state(j, 0), ShardState::Pending);
    sim.round();
    let second = sim.attempt(j, 0);
    assert_ne!(first, second);
    assert_eq!(sim.state.job(j).unwrap().shards[0].attempt.as_ref().unwrap().number, 2);
    let late = Command::ShardExited { attempt: first, exit: ok(1), node_fault: false, message: None };
    assert_eq!(sim.apply(late).unwrap_err(), Rejection::StaleAttempt(first));
    let late = Command::RecordCheckpoint { attempt: first, step: 99, uri: "x".into() };
    assert_eq!(sim.apply(late).unwrap_err(), Rejection::StaleAttempt(first));
    assert_eq!(sim.shard_state(j, 0), ShardState::Assigned);
}

#[test]
fn lost_node_requeues_from_the_checkpoint_and_restarts_the_gang() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let b = sim.node(n("b"));
    sim.node(n("c"));
    let j = sim.submit(spec(2, 8));
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![a, b]);
    sim.start_all(j);
    let att0 = sim.attempt(j, 0);
    sim.now += 1000;
    sim.apply(Command::RecordCheckpoint { attempt: att0, step: 500, uri: "/ckpt/500".into() }).unwrap();
    let ev = sim.apply(Command::MarkNodeDown { node: b, reason: "agent lost".into(), registration: None }).unwrap();
    // Rank 1 lost its node; rank 0 is asked to stop for a gang restart.
    assert!(ev.contains(&Event::StopRequested {
        job: j,
        shard: 0,
        attempt: att0,
        node: a,
        reason: StopReason::GangRestart
    }));
    assert_eq!(sim.shard_state(j, 1), ShardState::Pending);
    assert_eq!(sim.shard_state(j, 0), ShardState::Stopping(StopReason::GangRestart));
    let (out, _) = sim.round();
    assert!(out.plan.placements.is_empty(), "no partial gang while a rank is still stopping");
    sim.killed(att0, 15);
    assert_eq!(sim.shard_state(j, 0), ShardState::Pending);
    assert_eq!(sim.state.job(j).unwrap().failures, 0, "infrastructure failures use no retry budget");
    let (_, ev) = sim.round();
    let resumes: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            Event::ShardAssigned { resume_from, number, .. } => Some((resume_from.clone(), *number)),
            _ => None,
        })
        .collect();
    assert_eq!(resumes, vec![(Some("/ckpt/500".into()), 2), (Some("/ckpt/500".into()), 2)]);
    assert!(!sim.nodes_of(j).contains(&b), "the down node takes nothing");
    assert_eq!(sim.state.job(j).unwrap().shards[1].restarts, 1);
}

#[test]
fn partial_gang_repair_keeps_the_survivors_on_their_gpus_and_moves_only_the_faulty_rank() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let b = sim.node(n("b"));
    let j = sim.submit(spec(2, 4));
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![a, a], "a gang prefers one node");
    sim.start_all(j);
    // Cheaper nodes arrive: a fresh placement would go there.
    let cheap = |name| NodeSpec { price: 1_000_000, ..n(name) };
    let c = sim.node(cheap("c"));
    sim.node(cheap("d"));
    let gpus = |sim: &Sim| -> Vec<Vec<u32>> {
        sim.state.job(j).unwrap().shards.iter().map(|s| s.attempt.as_ref().unwrap().gpus.clone()).collect()
    };
    let before = gpus(&sim);

    // Rank 1 fails by itself (exit 1): nothing is wrong with its node, so the whole gang
    // restarts where it was, on the same GPUs, after the retry backoff.
    sim.exit(j, 1, 1).unwrap();
    sim.exit(j, 0, 143).unwrap();
    sim.now += 10_001;
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![a, a]);
    assert_eq!(gpus(&sim), before, "the same GPUs");
    sim.start_all(j);

    // One of rank 1's GPUs fails (XID 79): rank 1 moves (node a has too few healthy GPUs left
    // for it) to the best fit elsewhere; rank 0 keeps its GPUs.
    let bad = before[1][0];
    sim.apply(Command::SetGpuHealth {
        node: a,
        gpu: bad,
        healthy: false,
        reason: "XID 79".into(),
        xid: None,
        cool_down: false,
    })
    .unwrap();
    let a0 = sim.attempt(j, 0);
    let a1 = sim.attempt(j, 1);
    sim.apply(Command::ShardExited { attempt: a1, exit: ok(1), node_fault: true, message: None }).unwrap();
    sim.apply(Command::ShardExited { attempt: a0, exit: ok(143), node_fault: false, message: None }).unwrap();
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![a, c], "rank 0 stays, rank 1 goes to the best other fit");
    assert_eq!(gpus(&sim)[0], before[0]);
    sim.start_all(j);

    // Rank 1's node is lost: rank 0 stays on a, rank 1 moves to the cheapest fit.
    let a0 = sim.attempt(j, 0);
    sim.apply(Command::MarkNodeDown { node: c, reason: "agent lost".into(), registration: None }).unwrap();
    sim.apply(Command::ShardExited { attempt: a0, exit: ok(143), node_fault: false, message: None }).unwrap();
    sim.round();
    let nodes = sim.nodes_of(j);
    assert_eq!(nodes[0], a);
    assert!(nodes[1] != c && nodes[1] != a, "{nodes:?}");
    let _ = b;
}

#[test]
fn retry_policy_backoff_and_never_retried_codes() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(1, 1);
    s.retry.max_attempts = 2;
    s.retry.backoff_secs = 30;
    s.retry.never_retry_exit_codes = vec![42];
    let j = sim.submit(s.clone());
    sim.round();
    sim.exit(j, 0, 1).unwrap();
    assert_eq!(sim.shard_state(j, 0), ShardState::Pending);
    let (out, _) = sim.round();
    assert_eq!(out.waiting.get(&j), Some(&WaitReason::Backoff));
    sim.now += 30_000;
    sim.round();
    assert_eq!(sim.shard_state(j, 0), ShardState::Assigned);
    sim.exit(j, 0, 1).unwrap();
    assert_eq!(sim.job_state(j), JobState::Failed, "two attempts used");
    assert!(sim.state.job(j).unwrap().message.as_deref().unwrap().contains("2 attempts"));

    let j2 = sim.submit(s);
    sim.round();
    sim.exit(j2, 0, 42).unwrap();
    assert_eq!(sim.job_state(j2), JobState::Failed);
    assert!(sim.state.job(j2).unwrap().message.as_deref().unwrap().contains("never retried"));
}

#[test]
fn a_failed_rank_stops_the_whole_job_when_retries_are_spent() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(n("b"));
    let mut s = spec(2, 8);
    s.retry.max_attempts = 1;
    let j = sim.submit(s);
    sim.round();
    sim.exit(j, 1, 3).unwrap();
    assert_eq!(sim.shard_state(j, 0), ShardState::Stopping(StopReason::JobFailed));
    assert_eq!(sim.job_state(j), JobState::Running, "still holds GPUs until rank 0 stops");
    sim.exit(j, 0, 143).unwrap();
    assert_eq!(sim.job_state(j), JobState::Failed);
    assert_eq!(sim.shard_state(j, 0), ShardState::Cancelled);
}

#[test]
fn cancel_pending_and_running_jobs() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let running = sim.submit(spec(1, 8));
    let pending = sim.submit(spec(1, 8));
    sim.round();
    sim.apply(Command::CancelJob { job: pending, reason: None }).unwrap();
    assert_eq!(sim.job_state(pending), JobState::Cancelled);
    assert!(sim.state.pending_jobs().is_empty());
    let ev = sim.apply(Command::CancelJob { job: running, reason: Some("user".into()) }).unwrap();
    assert!(ev.iter().any(|e| matches!(e, Event::StopRequested { reason: StopReason::Cancelled, .. })));
    assert_eq!(sim.job_state(running), JobState::Running);
    sim.exit(running, 0, 143).unwrap();
    assert_eq!(sim.job_state(running), JobState::Cancelled);
    let again = sim.apply(Command::CancelJob { job: running, reason: None }).unwrap_err();
    assert!(matches!(again, Rejection::JobFinished { .. }));
    assert_eq!(
        sim.apply(Command::CancelJob { job: JobId(99), reason: None }).unwrap_err(),
        Rejection::UnknownJob(JobId(99))
    );
}

#[test]
fn drain_moves_shards_unless_they_finish_before_the_deadline() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let mut short = spec(1, 4);
    short.max_runtime_secs = Some(600);
    let short = sim.submit(short);
    let long = sim.submit(spec(1, 4));
    sim.round();
    assert_eq!(sim.nodes_of(short), vec![a]);
    assert_eq!(sim.nodes_of(long), vec![a]);
    let deadline = Timestamp(sim.now + HOUR);
    sim.apply(Command::DrainNode { node: a, reason: DrainReason::Operator, deadline: Some(deadline) }).unwrap();
    assert_eq!(sim.shard_state(short, 0), ShardState::Assigned, "ends before the deadline");
    assert_eq!(sim.shard_state(long, 0), ShardState::Stopping(StopReason::Drain));
    sim.exit(long, 0, 143).unwrap();
    assert_eq!(sim.shard_state(long, 0), ShardState::Pending);
    let (out, _) = sim.round();
    assert!(out.plan.placements.is_empty(), "a draining node takes no shards");
    let b = sim.node(n("b"));
    sim.round();
    assert_eq!(sim.nodes_of(long), vec![b]);
    sim.apply(Command::UndrainNode { node: a }).unwrap();
    assert!(sim.apply(Command::UndrainNode { node: a }).is_err());
}

#[test]
fn unhealthy_gpu_stops_its_shard_and_stays_out_until_cleared() {
    let mut sim = Sim::new();
    let mut one = n("a");
    one.gpus = 2;
    let a = sim.node(one);
    let j = sim.submit(spec(1, 2));
    sim.round();
    let ev = sim
        .apply(Command::SetGpuHealth {
            node: a,
            gpu: 1,
            healthy: false,
            reason: "XID 79".into(),
            xid: None,
            cool_down: false,
        })
        .unwrap();
    assert!(ev.iter().any(|e| matches!(e, Event::StopRequested { reason: StopReason::GpuFault, .. })));
    let att = sim.attempt(j, 0);
    sim.apply(Command::ShardExited { attempt: att, exit: ok(1), node_fault: true, message: None }).unwrap();
    assert_eq!(sim.shard_state(j, 0), ShardState::Pending);
    let (out, _) = sim.round();
    assert!(out.plan.placements.is_empty(), "one healthy GPU left; the shard needs two");
    // The agent restarts: the GPU stays unhealthy.
    sim.node(n("a")).ne(&a).then(|| panic!("same name, same node"));
    let mut again = n("a");
    again.gpus = 2;
    sim.node(again);
    assert!(!sim.state.node(a).unwrap().gpus[1].healthy());
    sim.apply(Command::SetGpuHealth {
        node: a,
        gpu: 1,
        healthy: true,
        reason: "cleared by operator".into(),
        xid: None,
        cool_down: false,
    })
    .unwrap();
    sim.round();
    assert_eq!(sim.shard_state(j, 0), ShardState::Assigned);
    assert!(matches!(
        sim.apply(Command::SetGpuHealth {
            node: a,
            gpu: 9,
            healthy: false,
            reason: String::new(),
            xid: None,
            cool_down: false
        }),
        Err(Rejection::UnknownGpu { .. })
    ));
}

#[test]
fn snapshot_restore_and_hash() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(n("b"));
    let j = sim.submit(spec(2, 8));
    sim.submit(spec(1, 1));
    sim.round();
    sim.apply(Command::RecordCheckpoint { attempt: sim.attempt(j, 0), step: 3, uri: "/c/3".into() }).unwrap();
    let bytes = sim.state.snapshot();
    let restored = State::restore(&bytes).unwrap();
    assert_eq!(restored, sim.state);
    assert_eq!(restored.hash(), sim.state.hash());
    assert_eq!(restored.live_attempts(), sim.state.live_attempts());
    // A snapshot that claims a GPU is free while an attempt holds it is refused.
    let text = String::from_utf8(bytes).unwrap();
    let broken = text.replacen("\"holder\":1", "\"holder\":null", 1);
    assert_ne!(broken, text);
    let err = State::restore(broken.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("invariant"), "{err}");
    assert!(State::restore(b"{\"v\":7,\"state\":{}}").unwrap_err().to_string().contains("newer"));
    assert!(State::restore(b"not json").is_err());
}

/// The copy a snapshot is encoded from shares jobs and nodes with the live state: what the
/// state applies afterwards must not reach the copy, and the copy must encode exactly what
/// the state held when it was taken.
#[test]
fn a_snapshot_copy_keeps_what_the_state_held_when_it_was_taken() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    sim.node(n("b"));
    let j = sim.submit(spec(2, 8));
    let k = sim.submit(spec(1, 1));
    sim.round();
    let before = sim.state.snapshot();
    let live_before = sim.state.live_attempts().clone();
    assert_eq!(live_before.len(), 2);
    let copy = sim.state.snapshot_copy();
    assert_eq!(copy.snapshot(), before);
    // Shared, not copied: the Raft thread makes this copy, and a deep copy of 90,000 running
    // jobs held it for 0.6 s, long enough for the followers to elect another leader.
    let shared = |c: &State, s: &State| c.jobs().iter().all(|(id, j)| std::sync::Arc::ptr_eq(j, &s.jobs()[id]));
    assert!(shared(&copy, &sim.state));
    assert!(copy.nodes().iter().all(|(id, n)| std::sync::Arc::ptr_eq(n, &sim.state.nodes()[id])));
    // Change a job, a node and the set of jobs after the copy.
    sim.start_all(j);
    sim.apply(Command::RecordCheckpoint { attempt: sim.attempt(j, 0), step: 7, uri: "/c/7".into() }).unwrap();
    sim.apply(Command::SetGpuHealth {
        node: a,
        gpu: 0,
        healthy: false,
        reason: "XID 79".into(),
        xid: None,
        cool_down: false,
    })
    .unwrap();
    sim.apply(Command::CancelJob { job: k, reason: None }).unwrap();
    sim.submit(spec(1, 2));
    assert_ne!(sim.state.snapshot(), before, "the commands above changed nothing");
    assert_eq!(copy.snapshot(), before, "a write after the copy reached it");
    // The jobs written since were copied on write; the copy still shares none of them.
    assert!(!std::sync::Arc::ptr_eq(&copy.jobs()[&j], &sim.state.jobs()[&j]));
    assert!(!shared(&copy, &sim.state));
    // The copy restores to the state as it was, indexes rebuilt.
    let restored = State::restore(&copy.snapshot()).unwrap();
    assert_eq!(restored.snapshot(), before);
    assert_eq!(restored.job(j).unwrap().shards[0].state, ShardState::Assigned);
    assert_eq!(restored.live_attempts(), &live_before);
}

/// Found by the snapshot_restore fuzz target: a snapshot whose shard index or job key disagreed
/// with where the shard or job was stored made `check_invariants` index out of bounds (a panic
/// on `--restore-from`, and on a snapshot from a peer). Each is refused, naming the field.
#[test]
fn snapshots_with_misplaced_entries_are_refused_naming_them() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let j = sim.submit(spec(2, 2));
    sim.round();
    let snapshot: serde_json::Value = serde_json::from_slice(&sim.state.snapshot()).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = snapshot.clone();
        edit(&mut v["state"]);
        match State::restore(&serde_json::to_vec(&v).unwrap()) {
            Err(crate::state::SnapshotError::Inconsistent(m)) => m,
            other => panic!("expected an inconsistent snapshot, got {other:?}"),
        }
    };
    let key = j.0.to_string();
    let m = refused(&|s| s["jobs"][&key]["shards"][1]["index"] = 2.into());
    assert!(m.contains(&format!("jobs.{key}.shards[1].index is 2")), "{m}");
    let m = refused(&|s| {
        let job = s["jobs"][&key].take();
        s["jobs"].as_object_mut().unwrap().remove(&key);
        s["jobs"]["7"] = job;
    });
    assert!(m.contains(&format!("jobs.7.id is {key}")), "{m}");
    let m = refused(&|s| s["nodes"]["1"]["gpus"][0]["index"] = 5.into());
    assert!(m.contains("nodes.1.gpus[0].index is 5"), "{m}");
    let m = refused(&|s| s["tenants"]["default"]["name"] = "other".into());
    assert!(m.contains("tenants.default.name is other"), "{m}");
}

/// Found by the snapshot_restore fuzz target: a restored spec was never validated, and its
/// GPUs per shard times the shards per node overflowed in the planner; a restored node's price
/// times a gang's GPUs too. A snapshot is held to what the commands check on the way in.
#[test]
fn snapshots_are_held_to_what_commands_check() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let j = sim.submit(spec(2, 2));
    sim.round();
    let snapshot: serde_json::Value = serde_json::from_slice(&sim.state.snapshot()).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = snapshot.clone();
        edit(&mut v["state"]);
        match State::restore(&serde_json::to_vec(&v).unwrap()) {
            Err(crate::state::SnapshotError::Inconsistent(m)) => m,
            Ok(restored) => {
                // What the server does next: it plans.
                plan(&restored, Timestamp(sim.now), &PlanLimits::default());
                panic!("an out-of-bounds snapshot was restored")
            }
            Err(other) => panic!("expected an inconsistent snapshot, got {other}"),
        }
    };
    let key = j.0.to_string();
    let m = refused(&|s| s["jobs"][&key]["spec"]["resources"]["gpus"] = 2_147_483_648u64.into());
    assert!(m.starts_with(&format!("jobs.{key}.spec.resources.gpus: ")), "{m}");
    let m = refused(&|s| s["nodes"]["1"]["info"]["price_micros_per_gpu_hour"] = u64::MAX.into());
    assert!(m.starts_with("nodes.1.info.price_micros_per_gpu_hour: "), "{m}");
    let m = refused(&|s| s["jobs"][&key]["spec"]["shards"] = 3.into());
    assert!(m.contains(&format!("jobs.{key}.shards has 2 shards, its spec 3")), "{m}");
}

/// The same price from an agent's registration: refused, naming the field, so that no node
/// the planner cannot add up enters the state.
#[test]
fn a_price_the_planner_cannot_add_up_is_refused() {
    let mut sim = Sim::new();
    let mut dear = n("dear");
    dear.price = u64::MAX / 4;
    let err = sim.apply(Command::RegisterNode { info: info(&dear) }).unwrap_err();
    assert!(err.to_string().starts_with("price_micros_per_gpu_hour: "), "{err}");
    let mut top = n("top");
    top.price = crate::state::MAX_PRICE_MICROS_PER_GPU_HOUR;
    sim.node(top);
    sim.submit(spec(1, 8));
    let (out, _) = sim.round();
    assert_eq!(out.plan.shard_count(), 1);
}

#[test]
fn register_validates_input() {
    let mut sim = Sim::new();
    let mut bad = info(&n("a"));
    bad.name = "has space".into();
    assert!(matches!(
        sim.apply(Command::RegisterNode { info: bad }),
        Err(Rejection::InvalidArgument { field: "name", .. })
    ));
    let mut bad = info(&n("a"));
    bad.gpus = (0..65).map(|i| GpuInfo { uuid: format!("g{i}"), model: "x".into(), memory_mib: 1 }).collect();
    assert!(matches!(
        sim.apply(Command::RegisterNode { info: bad }),
        Err(Rejection::InvalidArgument { field: "gpus", .. })
    ));
    assert!(sim.state.nodes().is_empty());
}

#[test]
fn reregistering_with_other_gpus_loses_the_attempts_on_them() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let j = sim.submit(spec(1, 8));
    sim.round();
    let mut changed = n("a");
    changed.gpus = 4;
    sim.node(changed);
    assert_eq!(sim.shard_state(j, 0), ShardState::Pending);
    assert_eq!(sim.state.node(a).unwrap().gpus.len(), 4);
    // Same GPUs: attempts survive a reconnect.
    let mut b = n("b");
    b.zone = "us-east-1b";
    let b_id = sim.node(b);
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![b_id]);
    let mut b = n("b");
    b.zone = "us-east-1b";
    sim.node(b);
    assert_eq!(sim.shard_state(j, 0), ShardState::Assigned);
}

// ----- planner -------------------------------------------------------------------------------

#[test]
fn gangs_are_placed_whole_or_not_at_all() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(n("b"));
    let big = sim.submit(spec(3, 8));
    let (out, _) = sim.round();
    assert!(out.plan.placements.is_empty());
    assert_eq!(out.waiting.get(&big), Some(&WaitReason::Unschedulable));
    assert!(sim.state.job(big).unwrap().shards.iter().all(|s| s.state == ShardState::Pending));
    let fits = sim.submit(spec(2, 8));
    sim.round();
    assert_eq!(sim.job_state(fits), JobState::Running);
}

#[test]
fn topology_prefers_one_zone_and_never_spans_regions_or_clouds_unasked() {
    let mut sim = Sim::new();
    let mut z = n("a-1a");
    z.zone = "us-east-1a";
    sim.node(z);
    let mut z = n("b-1b");
    z.zone = "us-east-1b";
    let b = sim.node(z);
    let mut z = n("c-1b");
    z.zone = "us-east-1b";
    let c = sim.node(z);
    let j = sim.submit(spec(2, 8));
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![b, c], "both shards in zone 1b, though node a has the lowest id");

    let mut sim = Sim::new();
    let mut r = n("east");
    r.region = "us-east-1";
    sim.node(r);
    let mut r = n("west");
    r.region = "us-west-2";
    r.zone = "us-west-2a";
    sim.node(r);
    let stay = sim.submit(spec(2, 8));
    let (out, _) = sim.round();
    assert!(out.plan.placements.is_empty(), "two regions are not allowed by default");
    sim.apply(Command::CancelJob { job: stay, reason: None }).unwrap();
    let mut s = spec(2, 8);
    s.placement.span_regions = true;
    let span = sim.submit(s);
    sim.round();
    assert_eq!(sim.job_state(span), JobState::Running);

    let mut sim = Sim::new();
    sim.node(n("aws"));
    let mut az = n("azure");
    az.cloud = Cloud::Azure;
    az.region = "eastus";
    az.zone = "eastus-1";
    sim.node(az);
    let mut s = spec(2, 8);
    s.placement.span_regions = true;
    let j = sim.submit(s);
    let (out, _) = sim.round();
    assert!(out.plan.placements.is_empty(), "span_regions does not allow two clouds");
    sim.apply(Command::CancelJob { job: j, reason: None }).unwrap();
    let mut s = spec(2, 8);
    s.placement.span_clouds = true;
    let j = sim.submit(s);
    sim.round();
    assert_eq!(sim.job_state(j), JobState::Running);
}

#[test]
fn best_fit_keeps_whole_nodes_free_then_price_then_node_id() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let b = sim.node(n("b"));
    let six = sim.submit(spec(1, 6));
    sim.round();
    assert_eq!(sim.nodes_of(six), vec![a], "equal fit and price: lower node id");
    let one = sim.submit(spec(1, 1));
    sim.round();
    assert_eq!(sim.nodes_of(one), vec![a], "best fit: the node with 2 free, not the empty one");
    let eight = sim.submit(spec(1, 8));
    sim.round();
    assert_eq!(sim.nodes_of(eight), vec![b]);

    let mut sim = Sim::new();
    let mut dear = n("dear");
    dear.price = 5_000_000;
    sim.node(dear);
    let mut cheap = n("cheap");
    cheap.price = 2_000_000;
    let cheap = sim.node(cheap);
    let j = sim.submit(spec(1, 1));
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![cheap]);
}

#[test]
fn constraints_model_memory_labels_clouds_regions_and_spot() {
    let mut sim = Sim::new();
    let mut a100 = n("a100");
    a100.model = "NVIDIA A100-SXM4-40GB";
    a100.mem_gib = 40;
    let a100 = sim.node(a100);
    let mut h100 = info(&n("h100"));
    h100.labels.insert("fabric".into(), "efa".into());
    let h100 = sim.node_info(h100);
    let mut spot = n("spot");
    spot.spot = true;
    spot.cloud = Cloud::Azure;
    spot.region = "eastus";
    spot.price = 1_000_000;
    let spot = sim.node(spot);

    let place = |sim: &mut Sim, f: &dyn Fn(&mut JobSpec)| -> Vec<NodeId> {
        let mut s = spec(1, 1);
        f(&mut s);
        let j = sim.submit(s);
        sim.round();
        let nodes = sim.nodes_of(j);
        if !nodes.is_empty() {
            sim.exit(j, 0, 0).unwrap();
        } else {
            sim.apply(Command::CancelJob { job: j, reason: None }).unwrap();
        }
        nodes
    };
    assert_eq!(place(&mut sim, &|s| s.resources.gpu_model = Some("A100".into())), vec![a100]);
    assert_eq!(place(&mut sim, &|s| s.resources.gpu_model = Some("B200".into())), vec![]);
    assert_eq!(place(&mut sim, &|s| s.resources.min_gpu_memory_mib = 80 * 1024), vec![spot], "cheapest 80 GiB node");
    assert_eq!(
        place(&mut sim, &|s| {
            s.resources.min_gpu_memory_mib = 80 * 1024;
            s.placement.spot = SpotPolicy::Avoid;
        }),
        vec![h100]
    );
    assert_eq!(
        place(&mut sim, &|s| {
            s.placement.labels.insert("fabric".into(), "efa".into());
        }),
        vec![h100]
    );
    assert_eq!(place(&mut sim, &|s| s.placement.clouds = vec![Cloud::Azure]), vec![spot]);
    assert_eq!(
        place(&mut sim, &|s| s.placement.regions = vec!["us-east-1".into()]),
        vec![a100],
        "best-priced... lowest id among equals"
    );
    assert_eq!(place(&mut sim, &|s| s.placement.spot = SpotPolicy::Require), vec![spot]);
    assert_eq!(place(&mut sim, &|s| s.placement.spot = SpotPolicy::Prefer), vec![spot]);
    sim.apply(Command::DrainNode { node: spot, reason: DrainReason::SpotInterruption, deadline: None }).unwrap();
    assert_eq!(place(&mut sim, &|s| s.placement.spot = SpotPolicy::Require), vec![], "draining node excluded");
    assert_eq!(
        place(&mut sim, &|s| s.placement.spot = SpotPolicy::Prefer),
        vec![a100],
        "prefer falls back to on-demand"
    );
    sim.apply(Command::MarkNodeDown { node: a100, reason: "gone".into(), registration: None }).unwrap();
    assert_eq!(place(&mut sim, &|s| s.placement.clouds = vec![Cloud::Aws]), vec![h100], "down node excluded");
}

#[test]
fn priority_comes_first() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut low = spec(1, 8);
    low.priority = 100;
    let low = sim.submit(low);
    let mut high = spec(1, 8);
    high.priority = 900;
    let high = sim.submit(high);
    sim.round();
    assert_eq!(sim.job_state(high), JobState::Running);
    assert_eq!(sim.job_state(low), JobState::Pending);
}

#[test]
fn fair_share_orders_tenants_by_decayed_gpu_hours_and_weight() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    // Tenant "heavy" uses 8 GPUs for 10 hours.
    let mut s = spec(1, 8);
    s.tenant = "heavy".into();
    let used = sim.submit(s);
    sim.round();
    sim.now += 10 * HOUR;
    sim.exit(used, 0, 0).unwrap();
    let usage = sim.state.tenants()["heavy"].usage_at(Timestamp(sim.now), sim.state.config().fair_share_half_life_ms);
    assert!((usage - 80.0).abs() < 0.5, "about 80 GPU-hours, decayed a little: {usage}");

    let mut s = spec(1, 8);
    s.tenant = "heavy".into();
    let heavy = sim.submit(s);
    let mut s = spec(1, 8);
    s.tenant = "light".into();
    let light = sim.submit(s);
    sim.round();
    assert_eq!(sim.job_state(light), JobState::Running, "the tenant that used less goes first");
    assert_eq!(sim.job_state(heavy), JobState::Pending);
    sim.now += HOUR;
    sim.exit(light, 0, 0).unwrap();

    // With 100x the weight, heavy's 80 GPU-hours count as 0.8, less than light's 8 (+ lookahead).
    sim.apply(tenant_cmd("heavy", 100, None)).unwrap();
    let mut s = spec(1, 8);
    s.tenant = "light".into();
    let light2 = sim.submit(s);
    sim.round();
    assert_eq!(sim.job_state(heavy), JobState::Running);
    assert_eq!(sim.job_state(light2), JobState::Pending);
}

#[test]
fn quotas_hold_across_clouds() {
    let mut sim = Sim::new();
    sim.node(n("aws"));
    let mut az = n("az");
    az.cloud = Cloud::Azure;
    az.region = "eastus";
    sim.node(az);
    sim.apply(tenant_cmd("team", 1, Some(8))).unwrap();
    let mut s = spec(1, 8);
    s.tenant = "team".into();
    let first = sim.submit(s.clone());
    let second = sim.submit(s);
    let (out, _) = sim.round();
    assert_eq!(sim.job_state(first), JobState::Running);
    assert_eq!(out.waiting.get(&second), Some(&WaitReason::Quota));
    assert_eq!(sim.state.tenants()["team"].gpus_in_use, 8);
}

#[test]
fn backfill_runs_short_jobs_only_when_they_end_before_the_reservation() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let mut small = n("small");
    small.gpus = 1;
    small.zone = "us-east-1b";
    let small = sim.node(small);
    // Six GPUs of node a are busy for one hour.
    let mut r = spec(1, 6);
    r.max_runtime_secs = Some(3600);
    let running = sim.submit(r);
    sim.round();
    assert_eq!(sim.nodes_of(running), vec![a]);

    let gang = sim.submit(spec(1, 8));
    let long = sim.submit(spec(1, 1));
    let mut short = spec(1, 1);
    short.max_runtime_secs = Some(1800);
    let short = sim.submit(short);
    let mut too_long = spec(1, 1);
    too_long.max_runtime_secs = Some(7200);
    let too_long = sim.submit(too_long);
    let (out, _) = sim.round();
    let r = out.reservation.clone().expect("the blocked gang gets a reservation");
    assert_eq!(r.job, gang);
    assert_eq!(r.start, Timestamp(sim.now + HOUR), "when the 1-hour job ends");
    assert_eq!(r.gpus.get(&a).map(Vec::len), Some(8));
    assert_eq!(sim.nodes_of(short), vec![a], "ends before the reservation: backfilled");
    assert_eq!(sim.nodes_of(long), vec![small], "no runtime: only on GPUs outside the reservation");
    assert_eq!(out.waiting.get(&too_long), Some(&WaitReason::NoCapacity), "would delay the gang");
    assert_eq!(sim.job_state(gang), JobState::Pending);
}

/// A round tries each shape of job once: a later job of a shape that found no room waits
/// without a search, but one that differs in what decides where it fits (here: its runtime
/// lets it backfill into the reservation) is still tried.
#[test]
fn a_shape_that_found_no_room_is_not_tried_again_in_the_round_but_others_are() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let mut r = spec(1, 6);
    r.max_runtime_secs = Some(3600);
    sim.submit(r);
    sim.round();
    let gang = sim.submit(spec(1, 8));
    let long = sim.submit(spec(1, 1));
    let long_again = sim.submit(spec(1, 1));
    let mut short = spec(1, 1);
    short.max_runtime_secs = Some(1800);
    let short = sim.submit(short);
    let (out, _) = sim.round();
    assert_eq!(out.reservation.as_ref().map(|r| r.job), Some(gang));
    // The two free GPUs of node a are the gang's reservation: no job without a runtime fits.
    assert_eq!(out.waiting.get(&long), Some(&WaitReason::NoCapacity));
    assert_eq!(out.waiting.get(&long_again), Some(&WaitReason::NoCapacity));
    assert_eq!(sim.nodes_of(short), vec![a], "same resources, but it ends before the reservation");
    assert_eq!(out.plan.shard_count(), 1);
}

#[test]
fn preemption_picks_the_victims_that_lose_least_and_requeues_them() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut low = spec(1, 4);
    low.priority = 100;
    let fresh = sim.submit(low.clone());
    let stale = sim.submit(low);
    sim.round();
    sim.start_all(fresh);
    sim.start_all(stale);
    sim.now += HOUR;
    sim.apply(Command::RecordCheckpoint { attempt: sim.attempt(fresh, 0), step: 10, uri: "/f/10".into() }).unwrap();
    sim.now += 60_000;
    let mut same = spec(1, 4);
    same.priority = 100;
    let equal = sim.submit(same);
    let (out, _) = sim.round();
    assert!(out.plan.preemptions.is_empty(), "equal priority never preempts");
    sim.apply(Command::CancelJob { job: equal, reason: None }).unwrap();

    let mut high = spec(1, 4);
    high.priority = 900;
    let high = sim.submit(high);
    let (out, ev) = sim.round();
    assert_eq!(out.plan.preemptions.len(), 1);
    assert_eq!(out.plan.preemptions[0].victims, vec![fresh], "checkpointed a minute ago: loses least");
    assert!(ev.iter().any(|e| matches!(e, Event::StopRequested { job, reason: StopReason::Preempted { by }, .. } if *job == fresh && *by == high)));
    assert_eq!(sim.shard_state(stale, 0), ShardState::Running);
    let (out, _) = sim.round();
    assert!(out.plan.preemptions.is_empty(), "no second preemption while the victim stops");
    assert_eq!(out.waiting.get(&high), Some(&WaitReason::AwaitingPreemption));
    sim.exit(fresh, 0, 143).unwrap();
    assert_eq!(sim.shard_state(fresh, 0), ShardState::Pending, "victims are requeued, not failed");
    assert_eq!(sim.state.job(fresh).unwrap().failures, 0);
    sim.round();
    assert_eq!(sim.job_state(high), JobState::Running);
    assert_eq!(sim.job_state(fresh), JobState::Pending);
    // Later the victim resumes from its checkpoint.
    sim.exit(high, 0, 0).unwrap();
    let (_, ev) = sim.round();
    assert!(ev.iter().any(|e| matches!(e, Event::ShardAssigned { job, resume_from: Some(uri), number: 2, .. } if *job == fresh && uri == "/f/10")));
}

#[test]
fn stale_plans_are_rejected_on_apply() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let j = sim.submit(spec(1, 8));
    let out = plan(&sim.state, Timestamp(sim.now), &PlanLimits::default());
    assert_eq!(out.plan.shard_count(), 1);
    sim.apply(Command::DrainNode { node: a, reason: DrainReason::Operator, deadline: None }).unwrap();
    let ev = sim.apply(Command::ApplyPlan { plan: out.plan.clone() }).unwrap();
    assert!(
        matches!(&ev[..], [Event::PlacementRejected { job, reason }] if *job == j && reason.contains("not ready")),
        "{ev:?}"
    );
    sim.apply(Command::UndrainNode { node: a }).unwrap();
    sim.apply(Command::ApplyPlan { plan: out.plan.clone() }).unwrap();
    assert_eq!(sim.job_state(j), JobState::Running);
    let ev = sim.apply(Command::ApplyPlan { plan: out.plan }).unwrap();
    assert!(matches!(&ev[..], [Event::PlacementRejected { .. }]), "the same plan twice places nothing twice");
}

#[test]
fn planning_is_deterministic_and_survives_a_snapshot() {
    let mut sim = Sim::new();
    for name in ["a", "b", "c", "d"] {
        sim.node(n(name));
    }
    for (i, g) in [1, 2, 4, 8, 3, 5].into_iter().enumerate() {
        let mut s = spec(1 + (i as u32 % 2), g);
        s.tenant = format!("t{}", i % 3);
        sim.submit(s);
    }
    let now = Timestamp(sim.now);
    let first = plan(&sim.state, now, &PlanLimits::default());
    let second = plan(&sim.state, now, &PlanLimits::default());
    let restored = State::restore(&sim.state.snapshot()).unwrap();
    let third = plan(&restored, now, &PlanLimits::default());
    assert_eq!(first, second);
    assert_eq!(first, third);
    assert!(!first.plan.is_empty());
}

// ----- property tests ------------------------------------------------------------------------

/// Abstract operations; the driver turns them into concrete commands against the current state.
#[derive(Debug, Clone)]
enum Op {
    Register {
        node: u8,
        gpus: u8,
        cloud: u8,
        zone: u8,
        spot: bool,
        price: u8,
    },
    Submit {
        shards: u8,
        gpus: u8,
        prio: u8,
        tenant: u8,
        cloud: u8,
        spot: u8,
        runtime: Option<u8>,
        span: bool,
        model: u8,
    },
    Plan,
    Start {
        pick: u16,
    },
    Exit {
        pick: u16,
        code: u8,
        node_fault: bool,
    },
    Checkpoint {
        pick: u16,
        step: u16,
    },
    Down {
        node: u8,
    },
    Drain {
        node: u8,
        deadline: bool,
    },
    Undrain {
        node: u8,
    },
    /// What the leader's limit loop proposes: a time limit, or a passed drain deadline.
    Limits {
        pick: u16,
        node: u8,
    },
    Health {
        node: u8,
        gpu: u8,
        healthy: bool,
    },
    Cancel {
        pick: u16,
    },
    Tenant {
        tenant: u8,
        weight: u8,
        quota: Option<u8>,
        hours: Option<u8>,
        cloud_hours: Option<(u8, u8)>,
        window: u8,
        max_prio: Option<u8>,
        mode: u8,
    },
    Tick {
        secs: u16,
    },
    /// A job array of `size` 1-GPU elements, at most `limit` unfinished (0: no limit).
    SubmitArray {
        size: u8,
        limit: u8,
    },
    /// A job depending on an existing one (which may be an array or an element).
    SubmitAfter {
        pick: u16,
        ok: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..6, 0u8..9, 0u8..3, 0u8..3, any::<bool>(), 1u8..5)
            .prop_map(|(node, gpus, cloud, zone, spot, price)| Op::Register { node, gpus, cloud, zone, spot, price }),
        4 => (1u8..4, 1u8..9, 0u8..5, 0u8..3, 0u8..3, 0u8..4, proptest::option::of(1u8..4), any::<bool>(), 0u8..3)
            .prop_map(|(shards, gpus, prio, tenant, cloud, spot, runtime, span, model)| Op::Submit {
                shards, gpus, prio, tenant, cloud, spot, runtime, span, model
            }),
        5 => Just(Op::Plan),
        2 => any::<u16>().prop_map(|pick| Op::Start { pick }),
        3 => (any::<u16>(), 0u8..3, any::<bool>()).prop_map(|(pick, code, node_fault)| Op::Exit { pick, code, node_fault }),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(pick, step)| Op::Checkpoint { pick, step }),
        1 => (0u8..6).prop_map(|node| Op::Down { node }),
        1 => (0u8..6, any::<bool>()).prop_map(|(node, deadline)| Op::Drain { node, deadline }),
        1 => (0u8..6).prop_map(|node| Op::Undrain { node }),
        1 => (any::<u16>(), 0u8..6).prop_map(|(pick, node)| Op::Limits { pick, node }),
        1 => (0u8..6, 0u8..8, any::<bool>()).prop_map(|(node, gpu, healthy)| Op::Health { node, gpu, healthy }),
        1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
        1 => (
            0u8..3,
            1u8..4,
            proptest::option::of(0u8..20),
            proptest::option::of(1u8..20),
            proptest::option::of((0u8..3, 1u8..20)),
            0u8..3,
            proptest::option::of(0u8..4),
            0u8..3,
        )
            .prop_map(|(tenant, weight, quota, hours, cloud_hours, window, max_prio, mode)| Op::Tenant {
                tenant, weight, quota, hours, cloud_hours, window, max_prio, mode
            }),
        2 => (1u16..4000).prop_map(|secs| Op::Tick { secs }),
        1 => (1u8..30, 0u8..4).prop_map(|(size, limit)| Op::SubmitArray { size, limit }),
        1 => (any::<u16>(), any::<bool>()).prop_map(|(pick, ok)| Op::SubmitAfter { pick, ok }),
    ]
}

const CLOUDS: [Cloud; 3] = [Cloud::Aws, Cloud::Azure, Cloud::None];
const MODELS: [&str; 2] = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"];

fn node_name(i: u8) -> String {
    format!("node-{i}")
}

fn node_id(state: &State, i: u8) -> Option<NodeId> {
    state.node_by_name(&node_name(i)).map(|n| n.id)
}

fn pick_live(state: &State, pick: u16) -> Option<AttemptId> {
    let live: Vec<AttemptId> = state.live_attempts().keys().copied().collect();
    (!live.is_empty()).then(|| live[pick as usize % live.len()])
}

/// Turn an abstract op into a command for the current state (None: nothing to do).
fn concretise(state: &State, op: &Op, now: Timestamp) -> Option<Command> {
    Some(match *op {
        Op::Register { node, gpus, cloud, zone, spot, price } => {
            let c = CLOUDS[cloud as usize];
            let mut i = info(&n("x"));
            i.gpus = (0..gpus)
                .map(|g| GpuInfo {
                    uuid: format!("GPU-{node}-{g}"),
                    model: MODELS[(node % 2) as usize].into(),
                    memory_mib: 81920,
                })
                .collect();
            i.name = node_name(node);
            i.cloud = c;
            i.region = format!("{c}-r{}", zone / 2);
            i.zone = format!("{c}-z{zone}");
            i.spot = spot;
            i.price_micros_per_gpu_hour = u64::from(price) * 1_000_000;
            Command::RegisterNode { info: i }
        }
        Op::Submit { shards, gpus, prio, tenant, cloud, spot, runtime, span, model } => {
            let mut s = spec(u32::from(shards), u32::from(gpus));
            // prio 4: the user gave none (the spec default stands unless the tenant has one).
            if prio < 4 {
                s.priority = u16::from(prio) * 300;
            }
            s.tenant = format!("t{tenant}");
            if cloud > 0 {
                s.placement.clouds = vec![CLOUDS[cloud as usize - 1]];
            }
            s.placement.spot =
                [SpotPolicy::Allow, SpotPolicy::Avoid, SpotPolicy::Prefer, SpotPolicy::Require][spot as usize];
            s.max_runtime_secs = runtime.map(|r| u64::from(r) * 1800);
            s.placement.span_regions = span;
            s.resources.gpu_model = match model {
                1 => Some("H100".into()),
                2 => Some("A100".into()),
                _ => None,
            };
            s.retry.max_attempts = 2;
            Command::SubmitJob {
                spec: s,
                idempotency_key: (tenant == 0).then(|| format!("k{shards}{gpus}")),
                priority_defaulted: prio == 4,
                submitted_by: (tenant == 1).then(|| "user/alice".into()),
            }
        }
        Op::Plan => Command::ApplyPlan { plan: plan(state, now, &PlanLimits::default()).plan },
        Op::Start { pick } => Command::ShardStarted { attempt: pick_live(state, pick)? },
        Op::Exit { pick, code, node_fault } => Command::ShardExited {
            attempt: pick_live(state, pick)?,
            exit: ok(i32::from(code)),
            node_fault,
            message: None,
        },
        Op::Checkpoint { pick, step } => Command::RecordCheckpoint {
            attempt: pick_live(state, pick)?,
            step: u64::from(step),
            uri: format!("/ckpt/{step}"),
        },
        Op::Down { node } => {
            Command::MarkNodeDown { node: node_id(state, node)?, reason: "lost".into(), registration: None }
        }
        Op::Drain { node, deadline } => Command::DrainNode {
            node: node_id(state, node)?,
            reason: DrainReason::Operator,
            deadline: deadline.then(|| now.plus_ms(HOUR)),
        },
        Op::Undrain { node } => Command::UndrainNode { node: node_id(state, node)? },
        Op::Limits { pick, node } => {
            let attempt = pick_live(state, pick)?;
            let job = state.live_attempts().get(&attempt)?.job;
            if state.past_time_limit(job, attempt, now) {
                Command::TimeLimit { job, attempt }
            } else {
                let node = node_id(state, node)?;
                if state.past_drain_deadline(node, now).is_empty() {
                    return None;
                }
                Command::DrainDeadline { node }
            }
        }
        Op::Health { node, gpu, healthy } => Command::SetGpuHealth {
            node: node_id(state, node)?,
            gpu: u32::from(gpu),
            healthy,
            reason: "XID 79".into(),
            xid: None,
            cool_down: false,
        },
        Op::Cancel { pick } => {
            let ids: Vec<JobId> = state.jobs().keys().copied().collect();
            Command::CancelJob { job: *ids.get(pick as usize % ids.len().max(1))?, reason: None }
        }
        Op::Tenant { tenant, weight, quota, hours, cloud_hours, window, max_prio, mode } => Command::SetTenant {
            name: format!("t{tenant}"),
            weight: u32::from(weight),
            gpu_quota: quota.map(u64::from),
            max_priority: max_prio.map(|p| u16::from(p) * 300),
            default_priority: max_prio.map(|p| u16::from(p) * 250),
            // Small quotas (1/8 to 2.4 GPU-hours), so that random runs reach them.
            gpu_hours_quota: hours.map(|h| f64::from(h) / 8.0),
            cloud_gpu_hours_quota: cloud_hours
                .map(|(c, h)| (CLOUDS[c as usize].to_string(), f64::from(h) / 8.0))
                .into_iter()
                .collect(),
            gpu_hours_window_ms: [60_000, HOUR, DEFAULT_GPU_HOURS_WINDOW_MS][window as usize],
            mode: [TenantWrite::Upsert, TenantWrite::Create, TenantWrite::Update][mode as usize],
        },
        Op::Tick { .. } => return None,
        Op::SubmitArray { size, limit } => {
            let mut s = spec(1, 1);
            let cap = if limit == 0 { String::new() } else { format!("%{limit}") };
            s.array = crate::spec::ArraySpec::parse(&format!("0-{}{cap}", size - 1)).ok();
            s.retry.max_attempts = 1;
            submit_cmd(s, None)
        }
        Op::SubmitAfter { pick, ok } => {
            let ids: Vec<JobId> = state.jobs().keys().copied().collect();
            let dep = *ids.get(pick as usize % ids.len().max(1))?;
            let mut s = spec(1, 2);
            if ok {
                s.after_ok = vec![dep.0];
            } else {
                s.after_any = vec![dep.0];
            }
            submit_cmd(s, None)
        }
    })
}

/// Check what a plan's placements promised: constraints, gangs whole, quotas (GPUs held, and
/// GPU-hours of the window at the time of the plan).
fn check_placements(before: &State, after: &State, events: &[Event], now: Timestamp) -> Result<(), TestCaseError> {
    let mut placed: BTreeMap<JobId, Vec<(u32, NodeId, Vec<u32>)>> = BTreeMap::new();
    for e in events {
        if let Event::ShardAssigned { job, shard, node, gpus, .. } = e {
            placed.entry(*job).or_default().push((*shard, *node, gpus.clone()));
        }
    }
    for (job, shards) in &placed {
        let j = before.job(*job).unwrap();
        let pending: Vec<u32> = j.shards.iter().filter(|s| s.state == ShardState::Pending).map(|s| s.index).collect();
        let mut got: Vec<u32> = shards.iter().map(|s| s.0).collect();
        got.sort();
        prop_assert_eq!(&got, &pending, "gang of {} not placed whole", job);
        let mut infos = Vec::new();
        for (_, node, gpus) in shards {
            let nd = before.node(*node).unwrap();
            prop_assert!(nd.schedulable(), "{} placed on non-ready {}", job, node);
            prop_assert!(node_admits(&j.spec, nd), "{} placed on {} against its constraints", job, node);
            prop_assert_eq!(gpus.len() as u32, j.spec.resources.gpus);
            for g in gpus {
                let gpu = &nd.gpus[*g as usize];
                prop_assert!(gpu.healthy() && gpu.holder.is_none(), "GPU {} of {} was not free", g, node);
                prop_assert!(j.spec.gpu_matches(&gpu.model, gpu.memory_mib));
            }
            let t = &before.tenants()[&j.spec.tenant];
            prop_assert!(
                !t.gpu_hours_exhausted_on(nd.info.cloud, now),
                "{} placed on {} although tenant {} used its GPU-hours there",
                job,
                node,
                t.name
            );
            infos.push(&nd.info);
        }
        prop_assert!(span_ok(&j.spec, infos.into_iter()), "{} spans clouds or regions", job);
    }
    for (name, t) in after.tenants() {
        if let Some(q) = t.gpu_quota {
            let was = before.tenants().get(name).map_or(0, |t| t.gpus_in_use);
            prop_assert!(t.gpus_in_use <= q.max(was), "tenant {} over quota: {} > {}", name, t.gpus_in_use, q);
        }
    }
    Ok(())
}

fn run_ops(ops: &[Op]) -> Result<(State, Vec<(Command, ApplyContext)>), TestCaseError> {
    let mut state = State::new();
    let mut log = Vec::new();
    let mut now = Timestamp(1_000_000);
    for op in ops {
        if let Op::Tick { secs } = op {
            now = now.plus_secs(u64::from(*secs));
            continue;
        }
        let Some(cmd) = concretise(&state, op, now) else { continue };
        let ctx = ApplyContext { index: log.len() as u64 + 1, now };
        let before = matches!(cmd, Command::ApplyPlan { .. }).then(|| state.clone());
        log.push((cmd.clone(), ctx));
        let result = state.apply(cmd, ctx);
        if let (Some(before), Ok(events)) = (before, &result) {
            check_placements(&before, &state, events, now)?;
        }
        state.check_invariants().map_err(TestCaseError::fail)?;
    }
    Ok((state, log))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// No GPU held twice, gangs whole, constraints and quotas honoured after every command.
    #[test]
    fn invariants_hold_under_random_commands(ops in proptest::collection::vec(op(), 1..120)) {
        run_ops(&ops)?;
    }

    /// Replaying the log gives the same state; snapshot then restore mid-way gives the same
    /// state as never stopping; the plan is the same on a restored state.
    #[test]
    fn replay_and_snapshot_give_the_same_state(ops in proptest::collection::vec(op(), 1..120), cut in any::<prop::sample::Index>()) {
        let (state, log) = run_ops(&ops)?;
        let mut replay = State::new();
        for (cmd, ctx) in &log {
            let _ = replay.apply(cmd.clone(), *ctx);
        }
        prop_assert_eq!(replay.hash(), state.hash());
        prop_assert_eq!(&replay, &state);

        let cut = if log.is_empty() { 0 } else { cut.index(log.len()) };
        let mut first = State::new();
        for (cmd, ctx) in &log[..cut] {
            let _ = first.apply(cmd.clone(), *ctx);
        }
        let mut resumed = State::restore(&first.snapshot()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (cmd, ctx) in &log[cut..] {
            // Commands also travel encoded through the log.
            let decoded = Command::decode(&cmd.encode()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let _ = resumed.apply(decoded, *ctx);
        }
        prop_assert_eq!(resumed.hash(), state.hash());

        let now = log.last().map_or(Timestamp(0), |l| l.1.now);
        let restored = State::restore(&state.snapshot()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(plan(&state, now, &PlanLimits::default()), plan(&restored, now, &PlanLimits::default()));
        prop_assert_eq!(plan(&state, now, &PlanLimits::default()), plan(&state, now, &PlanLimits::default()));
    }
}

#[test]
fn a_node_down_judged_before_a_new_registration_is_refused() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let judged = sim.state.node(a).unwrap().registration;
    // The agent reconnects before the leader's verdict is applied.
    sim.node(n("a"));
    let late = Command::MarkNodeDown { node: a, reason: "silent".into(), registration: Some(judged) };
    assert!(matches!(sim.apply(late), Err(Rejection::FailedPrecondition(_))));
    assert_eq!(sim.state.node(a).unwrap().state, NodeState::Ready);
    let now = sim.state.node(a).unwrap().registration;
    sim.apply(Command::MarkNodeDown { node: a, reason: "silent".into(), registration: Some(now) }).unwrap();
    assert!(matches!(sim.state.node(a).unwrap().state, NodeState::Down { .. }));
}

#[test]
fn node_state_is_reported_in_events() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let ev = sim.apply(Command::MarkNodeDown { node: a, reason: "x".into(), registration: None }).unwrap();
    assert!(matches!(ev[..], [Event::NodeStateChanged { state: NodeState::Down { .. }, .. }]));
    assert_eq!(
        sim.apply(Command::MarkNodeDown { node: a, reason: "x".into(), registration: None }).unwrap(),
        vec![],
        "idempotent"
    );
    let ev = sim.apply(Command::RegisterNode { info: info(&n("a")) }).unwrap();
    assert!(ev.contains(&Event::NodeStateChanged { node: a, state: NodeState::Ready }));
    assert_eq!(sim.log.len(), 4);
}
