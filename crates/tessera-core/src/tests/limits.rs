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
        sim.killed(a, 15);
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

#[test]
fn a_stalled_rank_restarts_its_gang_from_the_checkpoint_without_using_a_retry() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(n("b"));
    sim.node(n("c"));
    let mut s = spec(2, 8);
    s.progress_timeout_secs = Some(600);
    let j = sim.submit(s);
    sim.round();
    sim.start_all(j);
    let (a0, a1) = (sim.attempt(j, 0), sim.attempt(j, 1));
    sim.apply(Command::RecordCheckpoint { attempt: a0, step: 40, uri: "/ckpt/40".into() }).unwrap();
    // Rank 1 hangs: it is stopped as stalled, rank 0 for the gang's restart.
    sim.apply(Command::Stalled { job: j, attempts: vec![a1] }).unwrap();
    assert_eq!(sim.shard_state(j, 1), ShardState::Stopping(StopReason::Stalled));
    assert_eq!(sim.shard_state(j, 0), ShardState::Stopping(StopReason::GangRestart));
    let e = sim
        .state
        .job(j)
        .unwrap()
        .events
        .iter()
        .find(|e| e.kind == crate::model::JobEventKind::Stopping { reason: StopReason::Stalled })
        .cloned()
        .unwrap();
    assert_eq!(e.detail.as_deref(), Some("no new step for 600 s; stalled ranks: 1"));
    for a in [a0, a1] {
        sim.killed(a, 9);
    }
    let job = sim.state.job(j).unwrap();
    assert!(job.shards.iter().all(|s| s.state == ShardState::Pending), "requeued");
    assert_eq!(job.failures, 0, "a hang uses no retry");
    let (_, ev) = sim.round();
    let resumes: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            Event::ShardAssigned { resume_from, .. } => resume_from.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(resumes, vec!["/ckpt/40".to_string(), "/ckpt/40".to_string()], "from the checkpoint");

    // Refused: a job without a timeout, an attempt that is not the job's, none at all.
    let k = sim.submit(spec(1, 1));
    sim.round();
    let other = sim.attempt(k, 0);
    assert!(sim.apply(Command::Stalled { job: k, attempts: vec![other] }).is_err());
    assert!(sim.apply(Command::Stalled { job: j, attempts: vec![other] }).is_err());
    assert!(sim.apply(Command::Stalled { job: j, attempts: vec![] }).is_err());
}

#[test]
fn a_job_that_hangs_again_and_again_without_a_new_checkpoint_fails() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(2, 2);
    s.progress_timeout_secs = Some(60);
    let j = sim.submit(s);
    let hang = |sim: &mut Sim| -> Vec<Event> {
        sim.round();
        sim.start_all(j);
        let a1 = sim.attempt(j, 1);
        sim.apply(Command::Stalled { job: j, attempts: vec![a1] }).unwrap()
    };
    let exit_all = |sim: &mut Sim| {
        for i in 0..2 {
            let attempt = sim.attempt(j, i);
            sim.killed(attempt, 9);
        }
    };
    // Two hangs: restarts. A new checkpoint in between starts the count again.
    hang(&mut sim);
    exit_all(&mut sim);
    hang(&mut sim);
    let a0 = sim.attempt(j, 0);
    sim.apply(Command::RecordCheckpoint { attempt: a0, step: 10, uri: "/ckpt/10".into() }).unwrap();
    assert_eq!(sim.state.job(j).unwrap().stalls, 0, "a new checkpoint clears the count");
    exit_all(&mut sim);
    for _ in 0..2 {
        hang(&mut sim);
        exit_all(&mut sim);
        assert_eq!(sim.job_state(j), JobState::Pending, "a restart");
    }
    // The third hang in a row from the same checkpoint: the job fails, saying why.
    hang(&mut sim);
    assert_eq!(sim.shard_state(j, 1), ShardState::Stopping(StopReason::Hung));
    assert_eq!(sim.shard_state(j, 0), ShardState::Stopping(StopReason::Hung));
    exit_all(&mut sim);
    let job = sim.state.job(j).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.message.as_deref(), Some("hung: no new step for 60 s, 3 times in a row without a new checkpoint"));
    assert_eq!((job.failures, job.shards[0].restarts), (0, 4), "{job:?}");
}

#[test]
fn gangs_whose_rank_0_share_a_node_get_rendezvous_ports_of_their_own() {
    let mut sim = Sim::new();
    let mut small = info(&n("a"));
    small.rendezvous_ports = Some((40_000, 40_001));
    let a = sim.node_info(small);
    let port = |sim: &Sim, j: JobId| sim.state.job(j).unwrap().shards[0].attempt.as_ref().unwrap().port;
    let jobs: Vec<JobId> = (0..3).map(|_| sim.submit(spec(1, 1))).collect();
    sim.round();
    assert!(jobs.iter().all(|j| sim.nodes_of(*j) == vec![a]));
    // Two ports in the node's range: the third gang gets none (the servers fall back to one per
    // job), and a port comes free when its gang ends.
    assert_eq!(jobs.iter().map(|j| port(&sim, *j)).collect::<Vec<_>>(), vec![Some(40_000), Some(40_001), None]);
    sim.exit(jobs[0], 0, 0).unwrap();
    let next = sim.submit(spec(1, 1));
    sim.round();
    assert_eq!(port(&sim, next), Some(40_000));
    // Only rank 0 holds one; a node naming no range uses the default.
    let mut sim = Sim::new();
    sim.node(n("b"));
    let g = sim.submit(spec(2, 4));
    sim.round();
    let ports: Vec<Option<u16>> =
        sim.state.job(g).unwrap().shards.iter().map(|s| s.attempt.as_ref().unwrap().port).collect();
    assert_eq!(ports, vec![Some(29_500), None]);
    // A range that is not one is refused at registration, naming it.
    let mut bad = info(&n("c"));
    bad.rendezvous_ports = Some((30_000, 29_000));
    assert!(matches!(
        sim.apply(Command::RegisterNode { info: bad }),
        Err(Rejection::InvalidArgument { field: "rendezvous_ports", .. })
    ));
}
