//! Job arrays and dependencies.

use super::*;
use crate::model::Job;
use crate::spec::ArraySpec;

fn array(indices: &str) -> JobSpec {
    let mut s = spec(1, 1);
    s.array = Some(ArraySpec::parse(indices).unwrap());
    s.retry.max_attempts = 1;
    s
}

fn elements(sim: &Sim, parent: JobId) -> Vec<&Job> {
    sim.state.jobs().values().filter(|j| j.element_of.is_some_and(|e| e.array == parent)).map(|j| &**j).collect()
}

/// Start and finish every placed element with `code`; returns how many.
fn finish_placed(sim: &mut Sim, parent: JobId, code: i32) -> usize {
    let placed: Vec<JobId> = elements(sim, parent)
        .iter()
        .filter(|j| j.shards.iter().any(|s| s.state == ShardState::Assigned))
        .map(|j| j.id)
        .collect();
    for j in &placed {
        sim.start_all(*j);
        sim.exit(*j, 0, code).unwrap();
    }
    placed.len()
}

#[test]
fn an_array_runs_its_elements_in_index_order_within_its_limit() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let parent = sim.submit(array("0-9%3"));
    assert_eq!(sim.job_state(parent), JobState::Pending);
    let made: Vec<(u64, u32)> =
        elements(&sim, parent).iter().map(|j| (j.id.0, j.element_of.map_or(99, |e| e.index))).collect();
    assert_eq!(made, [(2, 0), (3, 1), (4, 2)], "three elements, the next ids, indices 0..3");
    assert!(sim.state.job(parent).unwrap().shards.is_empty());
    assert!(!sim.state.pending_jobs().contains(&parent), "the array's own record is never placed");

    let mut seen = Vec::new();
    let mut rounds = 0;
    while !sim.job_state(parent).is_terminal() {
        rounds += 1;
        assert!(rounds < 20, "the array did not finish");
        sim.round();
        let live = elements(&sim, parent).iter().filter(|j| !j.state.is_terminal()).count();
        assert!(live <= 3, "{live} elements unfinished, limit 3");
        assert_eq!(sim.job_state(parent), JobState::Running);
        for j in elements(&sim, parent).iter().filter(|j| j.state == JobState::Running) {
            seen.push(j.element_of.map_or(99, |e| e.index));
        }
        finish_placed(&mut sim, parent, 0);
        // A restored copy is the same state with the same indexes (restore checks them).
        assert_eq!(State::restore(&sim.state.snapshot()).unwrap(), sim.state);
    }
    assert_eq!(seen, (0..10).collect::<Vec<u32>>());
    let p = sim.state.job(parent).unwrap();
    assert_eq!(p.state, JobState::Succeeded);
    assert_eq!(p.array.as_ref().map(|a| (a.next, a.active, a.queued, a.succeeded)), Some((10, 0, 0, 10)));
    assert!(p.finished_at.is_some() && p.started_at.is_some());
    assert_eq!(elements(&sim, parent).len(), 10);
}

#[test]
fn a_huge_array_puts_only_a_window_of_elements_in_the_queue() {
    let mut sim = Sim::new();
    let parent = sim.submit(array("0-99999"));
    assert_eq!(sim.state.jobs().len(), 1 + ARRAY_WINDOW as usize);
    assert_eq!(sim.state.pending_jobs().len(), ARRAY_WINDOW as usize);
    // Another tenant's job goes straight into the queue, as always.
    let mut other = spec(1, 1);
    other.tenant = "other".into();
    let o = sim.submit(other);
    assert!(sim.state.pending_jobs().contains(&o));
    // Placing elements lets the next ones in: the window stays full while elements remain.
    sim.node(n("a"));
    sim.node(n("b"));
    sim.round();
    let p = sim.state.job(parent).unwrap().array.clone().unwrap();
    assert_eq!((p.queued, p.active), (ARRAY_WINDOW, ARRAY_WINDOW + 16 - 1), "{p:?}");
    assert_eq!(sim.job_state(o), JobState::Running, "the other tenant's job was placed in the same round");
}

#[test]
fn a_failed_element_fails_the_array_and_the_rest_still_run() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let parent = sim.submit(array("0-3"));
    sim.round();
    let first = elements(&sim, parent)[0].id;
    sim.start_all(first);
    sim.exit(first, 0, 1).unwrap();
    assert_eq!(sim.job_state(first), JobState::Failed);
    assert_eq!(sim.job_state(parent), JobState::Running);
    finish_placed(&mut sim, parent, 0);
    let p = sim.state.job(parent).unwrap();
    assert_eq!(p.state, JobState::Failed);
    assert_eq!(p.message.as_deref(), Some("1 of 4 elements failed"));
}

#[test]
fn cancelling_an_array_cancels_its_elements_and_creates_no_more() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let parent = sim.submit(array("0-99%10"));
    sim.apply(Command::ApplyPlan { plan: plan(&sim.state, Timestamp(sim.now), &PlanLimits::default()).plan }).unwrap();
    let placed: Vec<JobId> =
        elements(&sim, parent).iter().filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
    assert_eq!(placed.len(), 8, "one node of 8 GPUs");
    sim.start_all(placed[0]);
    sim.apply(Command::CancelJob { job: parent, reason: Some("enough".into()) }).unwrap();
    assert_eq!(sim.job_state(parent), JobState::Running, "its placed elements still stop");
    for j in &placed {
        assert_eq!(sim.shard_state(*j, 0), ShardState::Stopping(StopReason::Cancelled));
        let attempt = sim.attempt(*j, 0);
        sim.killed(attempt, 15);
    }
    let p = sim.state.job(parent).unwrap();
    assert_eq!(p.state, JobState::Cancelled);
    assert_eq!(p.array.as_ref().map(|a| (a.next, a.cancelled, a.active)), Some((100, 100, 0)));
    assert_eq!(elements(&sim, parent).len(), 10, "no element was created after the cancel");
    assert!(elements(&sim, parent).iter().all(|j| j.state == JobState::Cancelled));
    assert!(matches!(sim.apply(Command::CancelJob { job: parent, reason: None }), Err(Rejection::JobFinished { .. })));
}

#[test]
fn after_ok_waits_for_success_and_cascades_a_failure() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut once = spec(1, 1);
    once.retry.max_attempts = 1;
    let a = sim.submit(once);
    let mut s = spec(1, 1);
    s.after_ok = vec![a.0];
    let b = sim.submit(s);
    let mut s = spec(1, 1);
    s.after_ok = vec![b.0];
    let c = sim.submit(s);
    let mut s = spec(1, 1);
    s.after_any = vec![a.0];
    let d = sim.submit(s);
    assert_eq!(sim.state.job(b).unwrap().waiting_on, vec![a]);
    assert!(!sim.state.pending_jobs().contains(&b) && !sim.state.pending_jobs().contains(&d));
    sim.round();
    assert_eq!(sim.job_state(a), JobState::Running);
    assert_eq!((sim.job_state(b), sim.shard_state(b, 0)), (JobState::Pending, ShardState::Pending), "b waits");
    // a fails: b can never run, nor can c; d (after-any) is released.
    sim.start_all(a);
    sim.exit(a, 0, 1).unwrap();
    let bj = sim.state.job(b).unwrap();
    assert_eq!(bj.state, JobState::Cancelled);
    assert_eq!(bj.message.as_deref(), Some("dependency never satisfied: job-1 ended failed (after-ok)"));
    assert_eq!(sim.job_state(c), JobState::Cancelled);
    assert!(sim.state.job(c).unwrap().message.as_deref().is_some_and(|m| m.contains("job-2 ended cancelled")));
    assert!(sim.state.job(d).unwrap().waiting_on.is_empty());
    assert!(sim.state.pending_jobs().contains(&d));
    sim.round();
    assert_eq!(sim.job_state(d), JobState::Running);
}

#[test]
fn after_ok_runs_the_job_once_its_dependency_succeeds() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let a = sim.submit(spec(1, 1));
    let mut s = spec(1, 1);
    s.after_ok = vec![a.0];
    let b = sim.submit(s);
    sim.round();
    sim.start_all(a);
    assert_eq!(State::restore(&sim.state.snapshot()).unwrap(), sim.state, "waiting survives a snapshot");
    sim.exit(a, 0, 0).unwrap();
    assert!(sim.state.pending_jobs().contains(&b));
    sim.round();
    assert_eq!(sim.job_state(b), JobState::Running);
}

#[test]
fn dependencies_that_cannot_be_met_are_refused_at_submission() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(1, 1);
    s.after_ok = vec![42];
    let err = sim.apply(submit_cmd(s, None)).unwrap_err();
    assert!(
        matches!(&err, Rejection::InvalidArgument { field: "after_ok", message } if message == "job-42 does not exist"),
        "{err}"
    );
    let a = sim.submit(spec(1, 1));
    sim.apply(Command::CancelJob { job: a, reason: None }).unwrap();
    let mut s = spec(1, 1);
    s.after_ok = vec![a.0];
    let err = sim.apply(submit_cmd(s, None)).unwrap_err();
    assert!(err.to_string().contains("job-1 already ended cancelled"), "{err}");
    // after-any on an ended job is met at once.
    let mut s = spec(1, 1);
    s.after_any = vec![a.0];
    let b = sim.submit(s);
    assert!(sim.state.pending_jobs().contains(&b));
    assert_eq!(sim.state.jobs().len(), 2, "refused submissions created nothing");
}

#[test]
fn an_array_waits_for_its_dependency_and_a_dependency_on_an_array_waits_for_all_of_it() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let a = sim.submit(spec(1, 1));
    let mut s = array("0-2");
    s.after_ok = vec![a.0];
    let arr = sim.submit(s);
    assert!(elements(&sim, arr).is_empty(), "no element before the dependency is met");
    let mut s = spec(1, 1);
    s.after_ok = vec![arr.0];
    let after = sim.submit(s);
    sim.round();
    sim.start_all(a);
    sim.exit(a, 0, 0).unwrap();
    assert_eq!(elements(&sim, arr).len(), 3);
    assert!(elements(&sim, arr).iter().all(|e| e.spec.after_ok.is_empty() && e.spec.array.is_none()));
    sim.round();
    finish_placed(&mut sim, arr, 0);
    assert_eq!(sim.job_state(arr), JobState::Succeeded);
    assert!(sim.state.pending_jobs().contains(&after));
}

#[test]
fn why_names_dependencies_and_arrays() {
    let mut sim = Sim::new();
    let a = sim.submit(spec(1, 1));
    let mut s = spec(1, 1);
    s.after_ok = vec![a.0];
    let b = sim.submit(s);
    let now = Timestamp(sim.now);
    let (kind, msg) = crate::why::brief(&sim.state, sim.state.job(b).unwrap(), None, now).unwrap();
    assert_eq!(kind, crate::why::WhyKind::Dependency);
    assert!(msg.contains("waits for job-1 to end"), "{msg}");
    let arr = sim.submit(array("0-9%2"));
    let (kind, msg) = crate::why::brief(&sim.state, sim.state.job(arr).unwrap(), None, now).unwrap();
    assert_eq!(kind, crate::why::WhyKind::Array);
    assert!(msg.contains("array of 10: 2 elements waiting for placement, 8 not created yet"), "{msg}");
    // Running, with the rest held back by its limit: still a reason.
    sim.node(n("a"));
    sim.round();
    assert_eq!(sim.job_state(arr), JobState::Running);
    let (kind, msg) = crate::why::brief(&sim.state, sim.state.job(arr).unwrap(), None, now).unwrap();
    assert_eq!(kind, crate::why::WhyKind::Array);
    assert!(msg.contains("0 elements waiting for placement, 8 not created yet; its limit of 2"), "{msg}");
}

#[test]
fn an_array_of_a_shape_no_node_holds_waits_and_others_are_still_placed() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = array("0-999");
    s.resources.gpu_model = Some("B200".into());
    let parent = sim.submit(s);
    let mut other = spec(1, 4);
    other.tenant = "other".into();
    let o = sim.submit(other);
    let (out, _) = sim.round();
    // Every waiting element is judged (once per round, as one shape), and none is placed.
    let waiting: Vec<&JobId> = sim.state.pending_jobs().iter().filter(|j| **j != o).collect();
    assert_eq!(waiting.len(), ARRAY_WINDOW as usize);
    assert!(waiting.iter().all(|j| out.waiting.get(j) == Some(&WaitReason::Unschedulable)), "{:?}", out.waiting);
    assert_eq!(sim.job_state(o), JobState::Running);
    assert_eq!(sim.job_state(parent), JobState::Pending);
}

#[test]
fn a_cancel_with_a_reason_at_the_length_limit_still_cancels_every_element() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let parent = sim.submit(array("0-19%12"));
    sim.round();
    sim.apply(Command::CancelJob { job: parent, reason: Some("r".repeat(1024)) }).unwrap();
    for e in elements(&sim, parent) {
        assert!(e.cancel_requested, "{} was not cancelled", e.id);
        assert_eq!(e.message.as_deref(), Some(format!("array {parent} cancelled").as_str()));
    }
}

#[test]
fn a_job_cancelled_while_waiting_waits_on_nothing_and_restores_equal() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut once = spec(1, 1);
    once.retry.max_attempts = 1;
    let a = sim.submit(once);
    let b = sim.submit(spec(1, 1));
    let mut s = spec(1, 1);
    s.after_ok = vec![a.0, b.0];
    let x = sim.submit(s);
    sim.round();
    sim.start_all(a);
    sim.exit(a, 0, 1).unwrap();
    let xj = sim.state.job(x).unwrap();
    assert_eq!(xj.state, JobState::Cancelled);
    assert!(xj.waiting_on.is_empty(), "{:?}", xj.waiting_on);
    assert_eq!(State::restore(&sim.state.snapshot()).unwrap(), sim.state);
    // A plan that places a job still waiting on a dependency is refused at apply.
    let mut s = spec(1, 1);
    s.after_any = vec![b.0];
    let y = sim.submit(s);
    let mut forged = plan(&sim.state, Timestamp(sim.now), &PlanLimits::default()).plan;
    assert!(forged.placements.iter().all(|p| p.job != y), "the planner does not place it");
    let mut free = sim.submit(spec(1, 1));
    let out = plan(&sim.state, Timestamp(sim.now), &PlanLimits::default()).plan;
    if let Some(mut p) = out.placements.into_iter().find(|p| p.job == free) {
        p.job = y;
        forged.placements.push(p);
        free = y;
    }
    assert_eq!(free, y, "a placement to forge");
    let ev = sim.apply(Command::ApplyPlan { plan: forged }).unwrap();
    assert!(ev.iter().any(|e| matches!(e, Event::PlacementRejected { job, .. } if *job == y)), "{ev:?}");
    assert_eq!(sim.shard_state(y, 0), ShardState::Pending);
}
