use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_proto::v1::server_message::Payload as Out;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn servers(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("s{i}:7000")).collect()
}

/// A protocol registered at `t0` with a 1 s heartbeat and a 3 s fence.
fn registered(t0: Instant) -> Protocol {
    let mut p = Protocol::new(servers(3), t0);
    p.next_address();
    p.register(v1::Register::default());
    p.registered(&registration(1000, 3000), t0);
    p
}

fn registration(heartbeat_ms: u64, fence_ms: u64) -> v1::Registered {
    v1::Registered { heartbeat_interval_ms: heartbeat_ms, fence_timeout_ms: fence_ms, ..Default::default() }
}

fn msg(p: Out) -> v1::ServerMessage {
    v1::ServerMessage { payload: Some(p) }
}

fn ack(seq: u64) -> v1::ServerMessage {
    msg(Out::Ack(v1::Ack { seq, ..Default::default() }))
}

fn checkpoint(attempt: u64, step: u64) -> In {
    In::CheckpointReport(v1::CheckpointReport { attempt_id: attempt, step, ..Default::default() })
}

fn chunk(attempt: u64, len: usize) -> In {
    In::LogChunk(v1::LogChunk { attempt_id: attempt, data: vec![b'x'; len], ..Default::default() })
}

/// The (seq, payload) of every send, kept or not.
fn sent(actions: &[Action]) -> Vec<(u64, In)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(m) | Action::SendOnce(m) => Some((m.seq, m.payload.clone()?)),
            _ => None,
        })
        .collect()
}

fn seqs(actions: &[Action]) -> Vec<u64> {
    sent(actions).into_iter().map(|(s, _)| s).collect()
}

fn ends(actions: &[Action]) -> Vec<SessionEnd> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::End(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn reports_are_numbered_in_order_after_the_registration() {
    let t0 = Instant::now();
    let mut p = Protocol::new(servers(1), t0);
    p.next_address();
    assert_eq!(p.register(v1::Register::default()).seq, 1);
    assert!(p.registered(&registration(1000, 3000), t0).is_empty());
    p.queue(checkpoint(7, 10));
    p.queue(checkpoint(7, 20));
    let out = p.flush();
    assert_eq!(sent(&out), vec![(2, checkpoint(7, 10)), (3, checkpoint(7, 20))]);
    assert!(out.iter().all(|a| matches!(a, Action::Send(_))), "reports are kept: {out:?}");
    // Sent once per session: a second flush sends nothing new.
    assert!(p.flush().is_empty());
    assert_eq!(p.unacknowledged(), 2);
}

#[test]
fn unacknowledged_reports_go_again_in_order_after_a_reconnect() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.queue(checkpoint(1, 1));
    p.queue(checkpoint(1, 2));
    p.queue(checkpoint(1, 3));
    assert_eq!(seqs(&p.flush()), vec![2, 3, 4]);
    p.on_message(ack(3), t0 + ms(10));
    assert_eq!(p.session_ended(SessionEnd::Broken, 0), Duration::ZERO);
    p.next_address();
    let reg = p.register(v1::Register::default());
    assert_eq!(reg.seq, 5, "sequence numbers keep growing across sessions");
    let resend = p.registered(&registration(1000, 3000), t0 + ms(20));
    assert_eq!(sent(&resend), vec![(2, checkpoint(1, 1)), (4, checkpoint(1, 3))]);
    // What was resent is not sent again by the next flush; new reports are.
    p.queue(checkpoint(1, 4));
    assert_eq!(seqs(&p.flush()), vec![6]);
}

#[test]
fn reports_queued_during_an_outage_go_once_at_the_next_registration() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.session_ended(SessionEnd::Broken, 0);
    // Between sessions: a shard exits, a GPU fails.
    p.started(3, 30);
    p.exited(3, 1, 0, Some(v1::shard_exited::Termination::ExitCode(0)));
    p.queue(In::GpuHealthReport(v1::GpuHealthReport { gpu_index: 1, ..Default::default() }));
    p.next_address();
    assert_eq!(p.register(v1::Register::default()).seq, 5);
    assert_eq!(p.finished().get(&3), Some(&(1, 0)), "the exit is listed at registration");
    assert_eq!(seqs(&p.registered(&registration(1000, 3000), t0)), vec![2, 3, 4]);
    assert!(p.flush().is_empty(), "nothing goes twice in one session");
}

#[test]
fn an_ack_removes_exactly_its_report() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    for step in 1..=4 {
        p.queue(checkpoint(1, step));
    }
    p.flush();
    // Acks are not cumulative: acknowledging 4 leaves 2, 3 and 5.
    p.on_message(ack(4), t0);
    assert_eq!(p.unacknowledged(), 3);
    // A refused report leaves too: it must not be sent again.
    p.on_message(msg(Out::Ack(v1::Ack { seq: 2, rejected: true, reason: "stale".into() })), t0);
    assert_eq!(p.unacknowledged(), 2);
    p.session_ended(SessionEnd::Broken, 0);
    p.next_address();
    p.register(v1::Register::default());
    assert_eq!(seqs(&p.registered(&registration(1000, 3000), t0)), vec![3, 5]);
}

#[test]
fn duplicate_and_unknown_acks_change_nothing_but_the_liveness() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.queue(checkpoint(1, 1));
    p.queue(checkpoint(1, 2));
    p.flush();
    p.on_message(ack(2), t0);
    // The same ack again, the registration's number, a heartbeat's, one never given out.
    for seq in [2, 1, 0, 999] {
        assert!(p.on_message(ack(seq), t0 + ms(2900)).is_empty());
    }
    assert_eq!(p.unacknowledged(), 1);
    // ... but each still shows the leader is alive: the fence counts from the last one.
    assert_eq!(p.fence_deadline(), t0 + ms(2900) + ms(3000));
}

#[test]
fn an_exit_is_listed_until_its_report_is_acknowledged() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.started(11, 4242);
    p.exited(11, 5, 2, Some(v1::shard_exited::Termination::ExitCode(3)));
    assert!(!p.is_running(11));
    assert_eq!(p.finished().get(&11), Some(&(5, 2)));
    let out = sent(&p.flush());
    assert_eq!(out.len(), 2);
    let (exit_seq, In::ShardExited(e)) = &out[1] else { panic!("expected the exit report: {out:?}") };
    assert_eq!(e.termination, Some(v1::shard_exited::Termination::ExitCode(3)));
    assert!(!e.node_fault);
    // Acking the start leaves the exit listed; acking the exit lists it no more.
    p.on_message(ack(out[0].0), t0);
    assert!(p.finished().contains_key(&11));
    p.on_message(ack(*exit_seq), t0);
    assert!(p.finished().is_empty());
    assert_eq!(p.unacknowledged(), 0);
}

#[test]
fn a_failed_start_is_reported_as_exit_127_and_never_tried_again() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    let assign = v1::AssignShard { attempt_id: 9, job_id: 1, ..Default::default() };
    let actions = p.on_message(msg(Out::AssignShard(assign.clone())), t0);
    assert_eq!(actions, vec![Action::Start(assign.clone())]);
    p.start_failed(9, "cannot start `x`".into());
    let out = sent(&p.flush());
    let [(_, In::ShardExited(e))] = out.as_slice() else { panic!("expected one exit: {out:?}") };
    assert_eq!(e.termination, Some(v1::shard_exited::Termination::ExitCode(127)));
    assert_eq!(e.message, "cannot start `x`");
    // The same assignment again (a new leader replaying it) starts nothing.
    assert!(p.on_message(msg(Out::AssignShard(assign)), t0).is_empty());
}

#[test]
fn a_running_attempt_is_not_started_twice_and_stops_only_if_running() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    let assign = v1::AssignShard { attempt_id: 4, ..Default::default() };
    assert_eq!(p.on_message(msg(Out::AssignShard(assign.clone())), t0).len(), 1);
    p.started(4, 100);
    assert!(p.on_message(msg(Out::AssignShard(assign)), t0).is_empty());
    let stop = |id| msg(Out::StopShard(v1::StopShard { attempt_id: id, ..Default::default() }));
    assert_eq!(p.on_message(stop(4), t0), vec![Action::Stop { attempt: 4 }]);
    assert!(p.on_message(stop(5), t0).is_empty());
}

#[test]
fn forgotten_attempts_lose_their_reports_and_their_listing() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.started(1, 100);
    p.started(2, 101);
    p.queue(checkpoint(1, 5));
    p.exited(2, 10, 1, Some(v1::shard_exited::Termination::Signal(9)));
    p.queue(In::GpuHealthReport(v1::GpuHealthReport { gpu_index: 0, ..Default::default() }));
    let forget = msg(Out::ForgetAttempts(v1::ForgetAttempts { attempt_ids: vec![1, 2], reason: "moved".into() }));
    assert_eq!(p.on_message(forget, t0), vec![Action::Forget { attempts: vec![1, 2] }]);
    assert!(!p.is_running(1));
    assert!(p.finished().is_empty());
    // Only the report about no attempt is left.
    assert_eq!(p.unacknowledged(), 1);
    // A forgotten attempt is not fenced.
    assert!(p.check_fence(t0 + ms(10_000)).is_empty());
}

#[test]
fn the_fence_fires_exactly_at_its_deadline_and_once_per_silence() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.started(1, 100);
    p.started(2, 101);
    assert!(p.check_fence(t0 + ms(2999)).is_empty());
    assert_eq!(p.check_fence(t0 + ms(3000)), vec![Action::Fence { attempts: vec![1, 2] }]);
    assert!(p.check_fence(t0 + ms(3050)).is_empty(), "once per silence");
    assert!(p.check_fence(t0 + ms(60_000)).is_empty());
    // The exits it caused are the node's fault.
    p.exited(1, 1, 0, Some(v1::shard_exited::Termination::Signal(9)));
    let out = sent(&p.flush());
    let Some((_, In::ShardExited(e))) = out.last() else { panic!("expected an exit: {out:?}") };
    assert!(e.node_fault);
    assert!(e.message.contains("fence"));
}

#[test]
fn acks_push_the_fence_deadline() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.started(1, 100);
    p.on_message(ack(1), t0 + ms(2500));
    assert!(p.check_fence(t0 + ms(3000)).is_empty());
    assert!(p.check_fence(t0 + ms(5499)).is_empty());
    assert_eq!(p.check_fence(t0 + ms(5500)), vec![Action::Fence { attempts: vec![1] }]);
    // A new silence after a later ack fences again, but only what is not fenced already.
    p.started(2, 101);
    p.on_message(ack(1), t0 + ms(6000));
    assert!(p.check_fence(t0 + ms(8999)).is_empty());
    assert_eq!(p.check_fence(t0 + ms(9000)), vec![Action::Fence { attempts: vec![2] }]);
}

#[test]
fn the_fence_needs_running_shards_and_takes_the_leaders_timeout() {
    let t0 = Instant::now();
    let mut p = Protocol::new(servers(1), t0);
    // Nothing runs: no fence however long the silence.
    assert!(p.check_fence(t0 + ms(3000)).is_empty());
    assert_eq!(p.fence_deadline(), t0 + DEFAULT_FENCE);
    p.next_address();
    p.register(v1::Register::default());
    p.registered(&registration(1000, 5000), t0);
    p.started(1, 100);
    assert!(p.check_fence(t0 + ms(4999)).is_empty());
    assert_eq!(p.check_fence(t0 + ms(5000)).len(), 1);
    // A fence below the minimum is raised to it, and so is the connect limit.
    let mut q = Protocol::new(servers(1), t0);
    q.registered(&registration(1000, 200), t0);
    assert_eq!(q.fence_deadline(), t0 + MIN_FENCE);
    assert_eq!(q.connect_limit(), Duration::from_secs(1));
    assert_eq!(p.connect_limit(), Duration::from_secs(5));
}

#[test]
fn heartbeats_are_due_at_once_then_every_interval() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    assert_eq!(p.next_heartbeat(), t0);
    assert_eq!(p.tick(t0), vec![Action::Heartbeat]);
    assert!(p.tick(t0 + ms(999)).is_empty());
    assert_eq!(p.next_heartbeat(), t0 + ms(1000));
    assert_eq!(p.tick(t0 + ms(1000)), vec![Action::Heartbeat]);
    // Late by more than an interval: the missed ones follow at once, on the old schedule (the
    // leader acknowledged something meanwhile, or the silence would end the session first).
    p.on_message(ack(1), t0 + ms(3000));
    assert_eq!(p.tick(t0 + ms(3500)), vec![Action::Heartbeat]);
    assert_eq!(p.tick(t0 + ms(3500)), vec![Action::Heartbeat]);
    assert!(p.tick(t0 + ms(3500)).is_empty());
    assert_eq!(p.next_heartbeat(), t0 + ms(4000));
    // The interval has a floor.
    let mut q = Protocol::new(servers(1), t0);
    q.registered(&registration(10, 3000), t0);
    q.tick(t0);
    assert_eq!(q.next_heartbeat(), t0 + MIN_HEARTBEAT);
}

#[test]
fn a_heartbeat_goes_after_the_queued_reports_and_is_not_kept() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.queue(checkpoint(1, 1));
    let hb = v1::Heartbeat { sent_unix_ms: 77, ..Default::default() };
    let actions = p.heartbeat(hb.clone(), t0);
    assert_eq!(actions.len(), 2);
    assert!(matches!(&actions[0], Action::Send(m) if m.seq == 2));
    assert_eq!(actions[1], Action::SendOnce(v1::AgentMessage { seq: 3, payload: Some(In::Heartbeat(hb)) }));
    assert_eq!(p.unacknowledged(), 1);
    // A log read's answer is not kept either, and is numbered after what was queued.
    p.queue(checkpoint(1, 2));
    let answer = p.answer(In::LogRead(v1::LogRead::default()));
    assert_eq!(seqs(&answer), vec![4, 5]);
    assert!(matches!(answer[1], Action::SendOnce(_)));
    assert_eq!(p.unacknowledged(), 2);
}

#[test]
fn a_session_silent_for_half_the_fence_ends_between_heartbeats_too() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    // 1 s heartbeats and a 3 s fence: 1.5 s of silence, well inside the fence.
    assert_eq!(p.silence_limit(), ms(1500));
    assert!(ends(&p.heartbeat(v1::Heartbeat::default(), t0 + ms(1500))).is_empty(), "not more than 1.5 s yet");
    assert_eq!(ends(&p.heartbeat(v1::Heartbeat::default(), t0 + ms(1501))), vec![SessionEnd::Silent]);
    // An ack resets the count.
    p.on_message(ack(2), t0 + ms(2500));
    assert!(ends(&p.heartbeat(v1::Heartbeat::default(), t0 + ms(4000))).is_empty());
    // The end comes after the heartbeat itself.
    let actions = p.heartbeat(v1::Heartbeat::default(), t0 + ms(4001));
    assert!(matches!(actions.first(), Some(Action::SendOnce(_))));
    assert_eq!(actions.last(), Some(&Action::End(SessionEnd::Silent)));
    // Between heartbeats, the session loop wakes at the end of the silence and a tick ends it.
    let mut p = registered(t0);
    p.tick(t0);
    assert_eq!(p.next_wake(), t0 + ms(1000), "the next heartbeat comes first");
    p.tick(t0 + ms(1000));
    assert_eq!(p.next_wake(), t0 + ms(1501));
    assert_eq!(p.tick(t0 + ms(1501)), vec![Action::End(SessionEnd::Silent)]);
    // A long heartbeat interval is capped by the fence too; a short fence keeps one interval.
    let mut p = Protocol::new(servers(1), t0);
    p.next_address();
    p.register(v1::Register::default());
    p.registered(&registration(1000, 10_000), t0);
    assert_eq!(p.silence_limit(), ms(3000), "three heartbeats when the fence is long");
    p.registered(&registration(1000, 1000), t0);
    assert_eq!(p.silence_limit(), ms(1000), "never under one heartbeat");
}

#[test]
fn servers_are_tried_in_turn_and_the_backoff_doubles_up_to_its_cap() {
    let t0 = Instant::now();
    let mut p = Protocol::new(servers(2), t0);
    let mut tried = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..12 {
        tried.push(p.next_address().unwrap_or_default());
        // No jitter gives half the wait.
        waits.push(p.session_ended(SessionEnd::Unreachable, 0).as_millis());
    }
    assert_eq!(tried[..4], ["s0:7000", "s1:7000", "s0:7000", "s1:7000"]);
    // Every server fails once before each wait: 100, 200, 400, 800 ms, then 1 s (halved).
    assert_eq!(waits, [0, 50, 0, 100, 0, 200, 0, 400, 0, 500, 0, 500]);
    // A broken registered session starts over: no wait, and the backoff is back at its base.
    assert_eq!(p.session_ended(SessionEnd::Broken, 0), Duration::ZERO);
    p.session_ended(SessionEnd::Unreachable, 0);
    assert_eq!(p.session_ended(SessionEnd::Unreachable, 101), ms(100));
}

#[test]
fn jitter_picks_a_wait_between_half_and_all_deterministically() {
    let d = ms(800);
    assert_eq!(jittered(d, 0), ms(400));
    assert_eq!(jittered(d, 400), ms(800));
    assert_eq!(jittered(d, 401), ms(400));
    assert_eq!(jittered(d, 123), ms(523));
    for r in [0, 1, 7, 12345, u64::MAX] {
        let w = jittered(MAX_BACKOFF, r);
        assert!(w >= MAX_BACKOFF / 2 && w <= MAX_BACKOFF, "{w:?}");
    }
    // The same randomness gives the same waits.
    let mut a = Protocol::new(servers(1), Instant::now());
    let mut b = Protocol::new(servers(1), Instant::now());
    for r in [3, 99, 5000] {
        assert_eq!(a.session_ended(SessionEnd::Unreachable, r), b.session_ended(SessionEnd::Unreachable, r));
    }
}

#[test]
fn leader_hints_are_followed_and_disagreement_waits_for_the_election() {
    let t0 = Instant::now();
    let mut p = Protocol::new(servers(2), t0);
    assert_eq!(p.next_address().as_deref(), Some("s0:7000"));
    let hint = |addr: &str| v1::NotLeader {
        leader: Some(v1::LeaderHint { leader_address: addr.into(), ..Default::default() }),
    };
    let end = not_leader(hint("s1:7000"));
    assert_eq!(end, SessionEnd::Redirect("s1:7000".into()));
    assert_eq!(p.session_ended(end, 0), Duration::ZERO);
    assert_eq!(p.next_address().as_deref(), Some("s1:7000"));
    // Two servers pointing at each other: the third redirect in a row waits.
    assert_eq!(p.session_ended(not_leader(hint("s0:7000")), 0), Duration::ZERO);
    assert_eq!(p.session_ended(not_leader(hint("s1:7000")), 0), ELECTION_RETRY / 2);
    assert_eq!(p.next_address().as_deref(), Some("s1:7000"));
    // No leader known: the election wait; then the next server in turn.
    assert_eq!(not_leader(hint("")), SessionEnd::NoLeader);
    assert_eq!(not_leader(v1::NotLeader::default()), SessionEnd::NoLeader);
    assert_eq!(p.session_ended(SessionEnd::NoLeader, 100), ELECTION_RETRY);
    assert_eq!(p.next_address().as_deref(), Some("s1:7000"));
    // A NotLeader in a session ends it.
    let actions = p.on_message(msg(Out::NotLeader(hint("s0:7000"))), t0);
    assert_eq!(actions, vec![Action::End(SessionEnd::Redirect("s0:7000".into()))]);
}

#[test]
fn the_first_session_is_not_a_reconnect_and_no_servers_means_no_address() {
    let t0 = Instant::now();
    let mut p = Protocol::new(servers(1), t0);
    p.next_address();
    assert!(!p.is_reconnect());
    p.session_ended(SessionEnd::Unreachable, 0);
    p.next_address();
    assert!(p.is_reconnect());
    let mut none = Protocol::new(Vec::new(), t0);
    assert_eq!(none.next_address(), None);
    // Nor does it divide by zero when sessions end.
    assert_eq!(none.session_ended(SessionEnd::Unreachable, 0), BASE_BACKOFF / 2);
}

#[test]
fn queued_output_beyond_its_bound_is_dropped_at_registration() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    let half = (LOG_OUTBOX_BYTES / 2) as usize;
    p.queue(chunk(1, half));
    p.queue(checkpoint(1, 1));
    p.queue(chunk(1, half));
    p.queue(chunk(1, 1));
    p.queue(checkpoint(1, 2));
    p.queue(chunk(1, 1));
    p.session_ended(SessionEnd::Broken, 0);
    let resend = p.registered(&registration(1000, 3000), t0);
    // The first 8 MiB of output stay with every other report; later output goes.
    assert_eq!(seqs(&resend), vec![2, 3, 4, 6]);
}

#[test]
fn the_cloud_event_is_acknowledged_once_everything_is_stopped_and_acknowledged() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.started(1, 100);
    p.acknowledge_when_idle("evt-1".into());
    assert!(p.idle_acks().is_empty(), "a shard runs");
    p.exited(1, 1, 0, Some(v1::shard_exited::Termination::ExitCode(0)));
    let out = seqs(&p.flush());
    p.on_message(ack(out[0]), t0);
    assert!(p.idle_acks().is_empty(), "the exit is not acknowledged yet");
    p.on_message(ack(out[1]), t0);
    assert_eq!(p.idle_acks(), vec![Action::AckCloudEvent("evt-1".into())]);
    assert!(p.idle_acks().is_empty(), "acknowledged once");
}

#[test]
fn the_stop_ladder_signals_then_waits_each_grace_then_kills() {
    let t0 = Instant::now();
    let mut l = StopLadder::new(true, ms(5000), ms(2000));
    assert_eq!(l.next(t0, false), Some(LadderStep { rung: Rung::Checkpoint, wait_until: Some(t0 + ms(5000)) }));
    // Each grace counts from its own signal.
    let t1 = t0 + ms(5003);
    assert_eq!(l.next(t1, false), Some(LadderStep { rung: Rung::Term, wait_until: Some(t1 + ms(2000)) }));
    let t2 = t1 + ms(2001);
    assert_eq!(l.next(t2, false), Some(LadderStep { rung: Rung::Kill, wait_until: None }));
    assert_eq!(l.next(t2, false), None);
}

#[test]
fn the_stop_ladder_without_a_checkpoint_signal_starts_at_sigterm() {
    let t0 = Instant::now();
    let mut l = StopLadder::new(false, ms(5000), ms(2000));
    assert_eq!(l.next(t0, false), Some(LadderStep { rung: Rung::Term, wait_until: Some(t0 + ms(2000)) }));
    assert_eq!(l.next(t0 + ms(2000), false).map(|s| s.rung), Some(Rung::Kill));
    // A zero grace still asks before the next signal.
    let mut z = StopLadder::new(true, Duration::ZERO, Duration::ZERO);
    assert_eq!(z.next(t0, false), Some(LadderStep { rung: Rung::Checkpoint, wait_until: Some(t0) }));
}

#[test]
fn the_stop_ladder_ends_once_the_shard_exited() {
    let t0 = Instant::now();
    let mut l = StopLadder::new(true, ms(5000), ms(2000));
    assert_eq!(l.next(t0, true), None, "an exited shard gets no signal");
    let mut l = StopLadder::new(true, ms(5000), ms(2000));
    assert!(l.next(t0, false).is_some());
    assert_eq!(l.next(t0 + ms(100), true), None);
    // Over for good.
    assert_eq!(l.next(t0 + ms(200), false), None);
}

#[test]
fn an_attempt_downloading_its_checkpoint_can_be_stopped_and_fenced_before_it_starts() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    let assign = v1::AssignShard { attempt_id: 7, job_id: 2, ..Default::default() };
    assert_eq!(p.on_message(msg(Out::AssignShard(assign)), t0).len(), 1);
    p.preparing(7);
    // Nothing is reported while it prepares, but a stop reaches it.
    assert!(p.flush().is_empty());
    let stop = msg(Out::StopShard(v1::StopShard { attempt_id: 7, ..Default::default() }));
    assert_eq!(p.on_message(stop, t0), vec![Action::Stop { attempt: 7 }]);
    // The fence covers it; once fenced it stays fenced when it is started.
    assert!(!p.is_fenced(7));
    assert_eq!(p.check_fence(t0 + ms(3000)), vec![Action::Fence { attempts: vec![7] }]);
    assert!(p.is_fenced(7));
    p.started(7, 100);
    assert!(p.is_fenced(7), "starting must not clear the fence");
    p.exited(7, 2, 0, None);
    let out = sent(&p.flush());
    let Some((_, In::ShardExited(e))) = out.last() else { panic!("expected an exit: {out:?}") };
    assert!(e.node_fault);
}

#[test]
fn a_download_that_fails_reports_exit_127_and_leaves_nothing_running() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.preparing(8);
    assert!(p.is_running(8));
    p.start_failed(8, "could not download the checkpoint s3://b/k: 404".into());
    assert!(!p.is_running(8));
    let out = sent(&p.flush());
    let [(_, In::ShardExited(e))] = out.as_slice() else { panic!("expected one exit: {out:?}") };
    assert_eq!(e.termination, Some(v1::shard_exited::Termination::ExitCode(127)));
    // Nothing left to fence, so the host can be acknowledged idle once the exit is.
    assert!(p.check_fence(t0 + ms(10_000)).is_empty());
}

#[test]
fn a_server_left_for_silence_is_not_tried_again_first_even_on_a_stale_hint() {
    let t0 = Instant::now();
    let mut p = Protocol::new(servers(3), t0);
    // The first try is s0, which points at s1, the leader.
    assert_eq!(p.next_address().as_deref(), Some("s0:7000"));
    p.session_ended(SessionEnd::Redirect("s1:7000".into()), 0);
    assert_eq!(p.next_address().as_deref(), Some("s1:7000"));
    p.registered(&registration(1000, 3000), t0);
    // s1 freezes: the session goes silent. In turn s1 would come next; it is skipped.
    p.session_ended(SessionEnd::Silent, 0);
    assert_eq!(p.next_address().as_deref(), Some("s2:7000"));
    // s2 has not heard of the election yet and points back at s1: not followed either.
    p.session_ended(SessionEnd::Redirect("s1:7000".into()), 0);
    assert_eq!(p.next_address().as_deref(), Some("s0:7000"));
    // Once registered elsewhere, s1 is an ordinary server again.
    p.registered(&registration(1000, 3000), t0);
    p.session_ended(SessionEnd::Redirect("s1:7000".into()), 0);
    assert_eq!(p.next_address().as_deref(), Some("s1:7000"));
}

#[test]
fn a_server_left_for_silence_is_tried_again_after_a_few_skips() {
    let t0 = Instant::now();
    let mut p = Protocol::new(servers(2), t0);
    assert_eq!(p.next_address().as_deref(), Some("s0:7000"));
    p.registered(&registration(1000, 3000), t0);
    p.session_ended(SessionEnd::Silent, 0);
    // It was only slow, and every other server points at it: after the skips it is tried.
    let mut tried = Vec::new();
    for _ in 0..8 {
        let a = p.next_address().unwrap();
        tried.push(a.clone());
        if a == "s0:7000" {
            break;
        }
        p.session_ended(SessionEnd::Redirect("s0:7000".into()), 0);
    }
    assert_eq!(tried.last().map(String::as_str), Some("s0:7000"), "{tried:?}");
    assert!(tried.len() > 2, "{tried:?}");
}

#[test]
fn only_checkpoints_the_servers_accepted_are_handed_out_for_pruning() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    p.started(3, 100);
    p.queue(checkpoint(3, 10));
    p.queue(checkpoint(3, 20));
    // The start, then the two checkpoints.
    let seqs = seqs(&p.flush());
    assert_eq!(seqs.len(), 3);
    // Step 10 accepted, step 20 refused.
    p.on_message(ack(seqs[1]), t0);
    p.on_message(msg(Out::Ack(v1::Ack { seq: seqs[2], rejected: true, ..Default::default() })), t0);
    assert_eq!(p.take_acked_checkpoints(), vec![(3, 10)]);
    assert!(p.take_acked_checkpoints().is_empty(), "each once");
}

#[test]
fn a_failed_start_s_message_is_cut_to_what_the_servers_accept() {
    let t0 = Instant::now();
    let mut p = registered(t0);
    let body = "é".repeat(5000);
    p.start_failed(4, format!("could not download the checkpoint s3://b/k: {body}"));
    let out = sent(&p.flush());
    let [(_, In::ShardExited(e))] = out.as_slice() else { panic!("expected one exit: {out:?}") };
    assert!(e.message.len() <= MAX_MESSAGE, "{}", e.message.len());
    assert!(e.message.starts_with("could not download the checkpoint s3://b/k: ") && e.message.ends_with("..."));
}
