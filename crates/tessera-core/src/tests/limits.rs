//! Time limits and drain deadlines, enforced.

use super::*;

#[test]
fn a_job_past_its_max_runtime_is_stopped_and_fails_with_time_limit() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(2, 4);
    s.max_runtime_secs = Some(60);
    let j = sim.submit(s);
    sim.round();
    sim.start_all(j);
    let attempt = sim.attempt(j, 0);
    // Within the limit: refused, nothing changes.
    sim.now += 59_999;
    assert!(!sim.state.past_time_limit(j, attempt, Timestamp(sim.now)));
    assert!(matches!(sim.apply(Command::TimeLimit { job: j, attempt }), Err(Rejection::FailedPrecondition(_))));
    assert_eq!(sim.shard_state(j, 0), ShardState::Running);
    sim.now += 1;
    assert!(sim.state.past_time_limit(j, attempt, Timestamp(sim.now)));
    let ev = sim.apply(Command::TimeLimit { job: j, attempt }).unwrap();
    assert_eq!(
        ev.iter().filter(|e| matches!(e, Event::StopRequested { reason: StopReason::TimeLimit, .. })).count(),
        2,
        "{ev:?}"
    );
    assert!(!sim.state.past_time_limit(j, attempt, Timestamp(sim.now)), "a stopping attempt is not stopped twice");
    // The shards end failed once their processes exit, and so does the job, saying why.
    for i in 0..2 {
        let a = sim.attempt(j, i);
        sim.apply(Command::ShardExited {
            attempt: a,
            exit: ExitStatus { code: None, signal: Some(15) },
            node_fault: false,
            message: None,
        })
        .unwrap();
    }
    let job = sim.state.job(j).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.message.as_deref(), Some("time limit: ran past its max runtime of 60 s"));
    assert!(job.shards.iter().all(|s| s.state == ShardState::Failed));
    assert_eq!(job.failures, 0, "a time limit uses no retry");
    // Without a max runtime there is no limit.
    let mut sim = Sim::new();
    sim.node(n("a"));
    let j = sim.submit(spec(1, 1));
    sim.round();
    let attempt = sim.attempt(j, 0);
    sim.now += 365 * 24 * HOUR;
    assert!(!sim.state.past_time_limit(j, attempt, Timestamp(sim.now)));
}

#[test]
fn shards_still_on_a_node_at_its_drain_deadline_are_stopped_and_requeued() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    sim.node(n("b"));
    // It declared it would end before the deadline, so the drain let it run on.
    let mut s = spec(1, 8);
    s.max_runtime_secs = Some(600);
    let j = sim.submit(s);
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![a]);
    sim.start_all(j);
    let deadline = Timestamp(sim.now + 900_000);
    sim.apply(Command::DrainNode { node: a, reason: DrainReason::Operator, deadline: Some(deadline) }).unwrap();
    assert_eq!(sim.shard_state(j, 0), ShardState::Running);
    assert!(sim.state.past_drain_deadline(a, Timestamp(sim.now)).is_empty());
    assert!(sim.apply(Command::DrainDeadline { node: a }).is_err(), "not yet");
    // Still there at the deadline (it overran its declaration): asked to checkpoint and move.
    sim.now = deadline.0;
    assert_eq!(sim.state.past_drain_deadline(a, deadline).len(), 1);
    sim.apply(Command::DrainDeadline { node: a }).unwrap();
    assert_eq!(sim.shard_state(j, 0), ShardState::Stopping(StopReason::Drain));
    let last = sim.state.job(j).unwrap().events.last().unwrap().clone();
    assert_eq!(last.detail.as_deref(), Some("the drain deadline passed"));
    let attempt = sim.attempt(j, 0);
    sim.apply(Command::ShardExited { attempt, exit: ok(143), node_fault: false, message: None }).unwrap();
    assert_eq!(sim.shard_state(j, 0), ShardState::Pending, "requeued, not failed");
    assert!(sim.apply(Command::DrainDeadline { node: a }).is_err(), "nothing left to stop");
}
