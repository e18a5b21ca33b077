//! Why a pending job waits (`crate::why`): each kind of reason, the funnel's counts, the
//! remedies offered, and the queue ahead.

use super::*;
use crate::why::{Briefs, WhyKind, brief, explain};

fn why_of(sim: &Sim, j: JobId, planned: Option<&WaitReason>) -> crate::why::Why {
    explain(&sim.state, j, planned, Timestamp(sim.now)).expect("the job exists")
}

#[test]
fn a_gang_larger_than_the_fleet_is_a_constraint_with_the_shard_count_that_would_fit() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(n("b"));
    let big = sim.submit(spec(3, 8));
    let (out, _) = sim.round();
    let w = why_of(&sim, big, out.waiting.get(&big));
    assert_eq!(w.kind, WhyKind::Constraint);
    assert!(w.reason.contains("needs 3 shards of 8 GPUs each"), "{}", w.reason);
    assert!(w.reason.contains("at most 2 such shards"), "{}", w.reason);
    assert!(w.remedies.iter().any(|r| r == "ask for at most 2 shards"), "{:?}", w.remedies);
    let counts: Vec<usize> = w.funnel.iter().map(|s| s.nodes).collect();
    assert_eq!(counts, vec![2, 2, 2, 2, 2]);
    assert_eq!(
        brief(&sim.state, sim.state.job(big).unwrap(), out.waiting.get(&big), Timestamp(sim.now)).unwrap().0,
        WhyKind::Constraint
    );
}

#[test]
fn a_model_no_node_has_names_the_models_there_and_the_step_where_nodes_ran_out() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(1, 4);
    s.resources.gpu_model = Some("A100".into());
    let j = sim.submit(s);
    let (out, _) = sim.round();
    let w = why_of(&sim, j, out.waiting.get(&j));
    assert_eq!(w.kind, WhyKind::Constraint);
    assert!(w.reason.contains("no admitted node has 4 healthy matching GPUs"), "{}", w.reason);
    assert!(w.reason.contains("NVIDIA H100 80GB HBM3"), "{}", w.reason);
    assert!(w.remedies.iter().any(|r| r.contains("NVIDIA H100 80GB HBM3")), "{:?}", w.remedies);
    let counts: Vec<usize> = w.funnel.iter().map(|s| s.nodes).collect();
    assert_eq!(counts, vec![1, 1, 1, 0, 0]);
}

#[test]
fn placement_rules_no_ready_node_meets_are_named() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(1, 1);
    s.placement.clouds = vec![Cloud::Azure];
    let j = sim.submit(s);
    sim.round();
    let w = why_of(&sim, j, None);
    assert_eq!(w.kind, WhyKind::Constraint);
    assert!(w.reason.contains("no ready node meets its placement rules (cloud azure)"), "{}", w.reason);
}

#[test]
fn with_every_node_drained_the_reason_counts_them() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    sim.apply(Command::DrainNode { node: a, reason: DrainReason::Operator, deadline: None }).unwrap();
    let j = sim.submit(spec(1, 1));
    sim.round();
    let w = why_of(&sim, j, None);
    assert_eq!(w.kind, WhyKind::Constraint);
    assert!(w.reason.contains("no node is ready (1 draining, 0 down)"), "{}", w.reason);
}

#[test]
fn a_full_fleet_is_capacity_with_the_jobs_ahead_and_the_first_declared_end() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut long = spec(1, 8);
    long.max_runtime_secs = Some(3600);
    // Above every waiting job: no preemption, so the planner skips the queue walk.
    long.priority = 950;
    let running = sim.submit(long);
    sim.round();
    sim.start_all(running);
    let mut hi = spec(1, 8);
    hi.priority = 900;
    let waiting = sim.submit(spec(1, 8));
    let high = sim.submit(hi);
    let later = sim.submit(spec(1, 8));
    sim.now += 60_000;
    let (out, _) = sim.round();
    // The planner skips the queue walk when nothing is free: no planned reason.
    assert!(out.waiting.is_empty());
    let w = why_of(&sim, later, None);
    assert_eq!(w.kind, WhyKind::Capacity);
    assert_eq!(w.ahead, 2, "the higher-priority job and the earlier one of its tenant");
    assert!(w.reason.contains("room for 0 of its shards now (1 with every GPU free)"), "{}", w.reason);
    assert!(w.reason.contains("declares its end in 59m 0s"), "{}", w.reason);
    assert_eq!(why_of(&sim, high, None).ahead, 0);
    assert_eq!(why_of(&sim, waiting, None).ahead, 1);
    let b = brief(&sim.state, sim.state.job(later).unwrap(), None, Timestamp(sim.now)).unwrap();
    assert_eq!(b.0, WhyKind::Capacity);
    // The running job is not pending, and says so.
    assert_eq!(why_of(&sim, running, None).kind, WhyKind::NotPending);
    assert!(brief(&sim.state, sim.state.job(running).unwrap(), None, Timestamp(sim.now)).is_none());
}

#[test]
fn a_job_that_avoids_spot_is_told_that_spot_nodes_have_room() {
    let mut sp = n("spot");
    sp.spot = true;
    let mut avoid = spec(1, 8);
    avoid.placement.spot = SpotPolicy::Avoid;
    // Only a spot node: the job could never run.
    let mut only_spot = Sim::new();
    let mut sp2 = n("spot");
    sp2.spot = true;
    only_spot.node(sp2);
    let j = only_spot.submit(avoid.clone());
    let (out, _) = only_spot.round();
    let w = why_of(&only_spot, j, out.waiting.get(&j));
    assert_eq!(w.kind, WhyKind::Constraint, "{}", w.reason);
    assert!(w.reason.contains("on-demand only"), "{}", w.reason);
    // An on-demand node that is busy and a free spot node: the spot node's room is the remedy.
    let mut sim = Sim::new();
    let od = sim.node(n("od"));
    sim.node(sp);
    let f = sim.submit(avoid.clone());
    sim.round();
    assert_eq!(sim.nodes_of(f), vec![od]);
    let j = sim.submit(avoid);
    sim.round();
    let w = why_of(&sim, j, None);
    assert_eq!(w.kind, WhyKind::Capacity, "{}", w.reason);
    assert!(w.remedies.iter().any(|r| r.contains("allow spot nodes") && r.contains("room for 1")), "{:?}", w.remedies);
}

#[test]
fn quota_and_backoff_are_explained_with_their_numbers() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(n("b"));
    sim.apply(tenant_cmd("team", 1, Some(8))).unwrap();
    let mut s = spec(1, 8);
    s.tenant = "team".into();
    let first = sim.submit(s.clone());
    let second = sim.submit(s);
    let (out, _) = sim.round();
    assert_eq!(sim.job_state(first), JobState::Running);
    let w = why_of(&sim, second, out.waiting.get(&second));
    assert_eq!(w.kind, WhyKind::Quota);
    assert!(w.reason.contains("tenant team holds 8 GPUs of its quota of 8, and this job needs 8"), "{}", w.reason);
    assert!(w.remedies.iter().any(|r| r.contains("at least 16")), "{:?}", w.remedies);

    let mut r = spec(1, 1);
    r.retry.backoff_secs = 30;
    let j = sim.submit(r);
    sim.round();
    sim.exit(j, 0, 1).unwrap();
    let w = why_of(&sim, j, None);
    assert_eq!(w.kind, WhyKind::Backoff);
    assert!(w.reason.contains("1 of 3 attempts used") && w.reason.contains("in 30s"), "{}", w.reason);
}

#[test]
fn a_job_the_planner_reserved_for_or_left_for_the_next_round_says_so() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let j = sim.submit(spec(1, 8));
    let at = Timestamp(sim.now + 90_000);
    let w = why_of(&sim, j, Some(&WaitReason::Reserved(at)));
    assert_eq!(w.kind, WhyKind::Reserved);
    assert!(w.reason.contains("expected free in 1m 30s"), "{}", w.reason);
    assert_eq!(why_of(&sim, j, Some(&WaitReason::PlanFull)).kind, WhyKind::PlanFull);
    // Nothing planned against it and everything free: the next round places it.
    assert_eq!(why_of(&sim, j, None).kind, WhyKind::NextRound);
}

#[test]
fn listing_reasons_for_jobs_no_round_judged_yet_come_from_the_fleet() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let holder = sim.submit(spec(1, 4));
    sim.round();
    sim.start_all(holder);
    // Submitted after the last round: no planned reason for any of them.
    let never = sim.submit(spec(1, 16));
    let fits = sim.submit(spec(1, 4));
    let full = sim.submit(spec(1, 8));
    let now = Timestamp(sim.now);
    let state = &sim.state;
    let mut briefs = Briefs::new(state, now);
    let mut kind =
        |j: JobId, planned: Option<&WaitReason>| briefs.reason(state.job(j).unwrap(), planned).map(|(k, _)| k);
    assert_eq!(kind(never, None), Some(WhyKind::Constraint));
    assert_eq!(kind(fits, None), Some(WhyKind::NextRound));
    assert_eq!(kind(full, None), Some(WhyKind::Capacity));
    assert_eq!(kind(holder, None), None);
    // The planner's judgement wins where there is one.
    assert_eq!(kind(full, Some(&WaitReason::AwaitingPreemption)), Some(WhyKind::AwaitingPreemption));
}
