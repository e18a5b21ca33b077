//! Each job's history of events ([`crate::timeline`]): what apply records, in what order, the
//! bound, and how the events read.

use super::*;
use crate::model::{JobEvent, JobEventKind, Requeue};
use crate::timeline::{Entry, HEAD, MAX_EVENTS, describe, dropped, events_after, events_total, timeline};

fn kinds(sim: &Sim, j: JobId, shard: u32) -> Vec<JobEventKind> {
    sim.state.job(j).unwrap().events.iter().filter(|e| e.shard == shard).map(|e| e.kind).collect()
}

#[test]
fn a_gang_records_placements_starts_checkpoints_faults_losses_and_requeues() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let b = sim.node(n("b"));
    sim.node(n("c"));
    let j = sim.submit(spec(2, 8));
    sim.now += 100;
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![a, b]);
    sim.now += 100;
    sim.start_all(j);
    let (att0, att1) = (sim.attempt(j, 0), sim.attempt(j, 1));
    sim.apply(Command::ShardStarted { attempt: att0 }).unwrap();
    sim.now += 1000;
    sim.apply(Command::RecordCheckpoint { attempt: att0, step: 500, uri: "/ckpt/500".into() }).unwrap();
    // Rank 1's node is lost: rank 1 is requeued, rank 0 stopped for a gang restart.
    sim.now += 1000;
    sim.apply(Command::MarkNodeDown { node: b, reason: "no heartbeat for 10 s".into(), registration: None }).unwrap();
    sim.killed(att0, 15);
    sim.round();

    let placed = |number| JobEventKind::Placed { number };
    assert_eq!(
        kinds(&sim, j, 0),
        vec![
            placed(1),
            JobEventKind::Started,
            JobEventKind::Checkpoint { step: 500 },
            JobEventKind::Stopping { reason: StopReason::GangRestart },
            JobEventKind::Exited { code: None, signal: Some(15) },
            JobEventKind::Requeued { why: Requeue::Stopped(StopReason::GangRestart), not_before: None },
            placed(2),
        ],
        "a second ShardStarted of the same attempt records nothing"
    );
    assert_eq!(
        kinds(&sim, j, 1),
        vec![
            placed(1),
            JobEventKind::Started,
            JobEventKind::NodeLost,
            JobEventKind::Requeued { why: Requeue::NodeLost, not_before: None },
            placed(2),
        ]
    );
    let job = sim.state.job(j).unwrap();
    let lost = job.events.iter().find(|e| e.kind == JobEventKind::NodeLost).unwrap();
    assert_eq!((lost.attempt, lost.node, lost.at), (Some(att1), Some(b), Timestamp(sim.now)));
    assert_eq!(lost.detail.as_deref(), Some("no heartbeat for 10 s"));
    let restart = job.events.iter().find(|e| matches!(e.kind, JobEventKind::Stopping { .. })).unwrap();
    assert_eq!(restart.detail.as_deref(), Some("shard 1 failed or was lost"), "names the rank that set it off");
    let again: Vec<_> = job.events.iter().filter(|e| e.kind == placed(2)).collect();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|e| e.detail.as_deref() == Some("resumes from the checkpoint at step 500")));
    assert!(again.iter().all(|e| e.node.is_some_and(|n| n != b)), "the new attempts' nodes");
    // Stored events are in time order.
    assert!(job.events.windows(2).all(|w| w[0].at <= w[1].at));
}

#[test]
fn gpu_faults_preemptions_spot_notices_and_retries_say_why() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let j = sim.submit(spec(1, 8));
    sim.round();
    sim.start_all(j);
    let gpu = sim.state.job(j).unwrap().shards[0].attempt.as_ref().unwrap().gpus[3];
    sim.apply(Command::SetGpuHealth {
        node: a,
        gpu,
        healthy: false,
        reason: "XID 79".into(),
        xid: None,
        cool_down: false,
    })
    .unwrap();
    let job = sim.state.job(j).unwrap();
    let last = job.events.last().unwrap();
    assert_eq!(last.kind, JobEventKind::Stopping { reason: StopReason::GpuFault });
    assert_eq!(last.detail, Some(format!("GPU {gpu}: XID 79")));
    assert_eq!(describe(last, "a"), format!("a GPU of a failed: stopping it (GPU {gpu}: XID 79)"));

    // A failure of its own code, with retries left: requeued after the backoff.
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(1, 8);
    s.retry.max_attempts = 3;
    s.retry.backoff_secs = 30;
    let j = sim.submit(s);
    sim.round();
    let attempt = sim.attempt(j, 0);
    sim.apply(Command::ShardExited {
        attempt,
        exit: ok(2),
        node_fault: false,
        message: Some("CUDA out of memory".into()),
    })
    .unwrap();
    let job = sim.state.job(j).unwrap();
    let [.., exited, requeued] = &job.events[..] else { panic!("{:?}", job.events) };
    assert_eq!(describe(exited, "a"), "exited with code 2 (CUDA out of memory)");
    assert_eq!(
        requeued.kind,
        JobEventKind::Requeued { why: Requeue::Retry, not_before: Some(Timestamp(sim.now + 30_000)) }
    );
    assert_eq!(
        describe(requeued, "a"),
        "back in the queue: it failed; the retry policy allows another attempt; not placed for 30 s"
    );

    // A spot notice on the node: the shard is asked to checkpoint and move.
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let j = sim.submit(spec(1, 8));
    sim.round();
    sim.start_all(j);
    let deadline = Some(Timestamp(sim.now + 120_000));
    sim.apply(Command::DrainNode { node: a, reason: DrainReason::SpotInterruption, deadline }).unwrap();
    let last = sim.state.job(j).unwrap().events.last().unwrap().clone();
    assert_eq!(last.kind, JobEventKind::Stopping { reason: StopReason::SpotInterruption });
    assert_eq!(describe(&last, "a"), "spot interruption notice for a: stopping it (the node goes away in 120 s)");

    // Preemption names the job it makes room for.
    let e = JobEvent {
        seq: 0,
        at: Timestamp(1),
        kind: JobEventKind::Stopping { reason: StopReason::Preempted { by: JobId(7) } },
        shard: 0,
        attempt: None,
        node: None,
        detail: None,
    };
    assert_eq!(describe(&e, "a"), "preempted by job 7 of higher priority: stopping it");
}

#[test]
fn the_history_is_bounded_dropping_checkpoints_first_and_keeping_every_attempt() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let mut s = spec(1, 8);
    s.retry.max_attempts = 3;
    s.retry.backoff_secs = 0;
    let j = sim.submit(s);
    let mut step = 0u64;
    let mut checkpoints = |sim: &mut Sim, n: u64| {
        let attempt = sim.attempt(j, 0);
        for _ in 0..n {
            step += 1;
            sim.now += 1;
            sim.apply(Command::RecordCheckpoint { attempt, step, uri: format!("/ckpt/{step}") }).unwrap();
        }
    };
    // Attempt 1 checkpoints 300 times and fails; attempt 2 checkpoints 300 times and succeeds.
    sim.round();
    sim.start_all(j);
    checkpoints(&mut sim, 300);
    sim.exit(j, 0, 1).unwrap();
    sim.now += 1;
    sim.round();
    sim.start_all(j);
    checkpoints(&mut sim, 299);
    let seen = events_total(sim.state.job(j).unwrap());
    checkpoints(&mut sim, 1);
    sim.exit(j, 0, 0).unwrap();

    let job = sim.state.job(j).unwrap();
    let total = 2 + 300 + 2 + 2 + 300 + 1;
    assert_eq!(events_total(job), total);
    assert_eq!(job.events.len(), MAX_EVENTS);
    assert_eq!(dropped(job), total - MAX_EVENTS as u64);
    // The start is kept whole, and so is every event that is not a checkpoint.
    assert!(job.events[..HEAD].iter().enumerate().all(|(i, e)| e.seq == i as u64));
    let others: Vec<JobEventKind> =
        job.events.iter().map(|e| e.kind).filter(|k| !matches!(k, JobEventKind::Checkpoint { .. })).collect();
    assert_eq!(
        others,
        vec![
            JobEventKind::Placed { number: 1 },
            JobEventKind::Started,
            JobEventKind::Exited { code: Some(1), signal: None },
            JobEventKind::Requeued { why: Requeue::Retry, not_before: None },
            JobEventKind::Placed { number: 2 },
            JobEventKind::Started,
            JobEventKind::Exited { code: Some(0), signal: None },
        ]
    );
    // The checkpoints kept are the first few and the latest.
    let last = job.events.iter().rev().find_map(|e| match e.kind {
        JobEventKind::Checkpoint { step } => Some(step),
        _ => None,
    });
    assert_eq!(last, Some(600));
    // A watcher that had seen all but the last checkpoint gets exactly what it missed.
    let after: Vec<JobEventKind> = events_after(job, seen).iter().map(|e| e.kind).collect();
    assert_eq!(
        after,
        vec![JobEventKind::Checkpoint { step: 600 }, JobEventKind::Exited { code: Some(0), signal: None }]
    );
    assert_eq!(events_after(job, 0).len(), MAX_EVENTS);
    assert!(events_after(job, total).is_empty());

    let t = timeline(job);
    assert_eq!(t[0], Entry::Submitted(job.submitted_at));
    let gaps: u64 = t.iter().filter_map(|e| if let Entry::Dropped(n) = e { Some(*n) } else { None }).sum();
    assert_eq!(gaps, dropped(job));
    assert_eq!(t[HEAD + 1], Entry::Dropped(300 - (HEAD as u64 - 2)), "attempt 1's later checkpoints went first");
    assert_eq!(t[t.len() - 1], Entry::Finished(job.finished_at.unwrap(), JobState::Succeeded));
    sim.state.check_invariants().unwrap();

    // The history travels in snapshots.
    let restored = State::restore(&sim.state.snapshot()).unwrap();
    assert_eq!(restored.job(j).unwrap().events, job.events);
}

#[test]
fn details_are_bounded_on_a_character_boundary() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let j = sim.submit(spec(1, 8));
    sim.round();
    let attempt = sim.attempt(j, 0);
    let words = "é".repeat(1000);
    sim.apply(Command::ShardExited { attempt, exit: ok(1), node_fault: false, message: Some(words) }).unwrap();
    let job = sim.state.job(j).unwrap();
    let exited = job.events.iter().find(|e| matches!(e.kind, JobEventKind::Exited { .. })).unwrap();
    let d = exited.detail.as_ref().unwrap();
    assert!(d.len() <= crate::timeline::MAX_DETAIL && d.len() >= crate::timeline::MAX_DETAIL - 1);
    assert!(d.chars().all(|c| c == 'é'));
}
