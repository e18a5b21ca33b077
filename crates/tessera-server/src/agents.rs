//! The leader's side of the agent stream (`AgentService.Session`).
//!
//! - Liveness lives in memory on the leader, never in the log: each session refreshes its
//!   node's last-seen time. A node whose stream closed and did not come back within the
//!   reconnect grace, or that sent nothing for the node-down timeout, is proposed down. Only
//!   that change of state enters the log. The node-down timeout is longer than the agents'
//!   fence timeout, so a cut-off agent has stopped its shards before they are placed again.
//! - What the agent reports (start, exit, checkpoint, GPU health, spot notice) becomes a
//!   command, and the agent gets an `Ack` once it is applied (or refused, e.g. a stale attempt).
//! - What the state machine decides for the node (assignments, stops, drains) is pushed to it
//!   from the applied events.
//! - On (re)connect the agent lists the attempts it runs. Those the state no longer has are
//!   forgotten (the agent stops them); live ones it lost are reported lost; assigned ones it
//!   never got are sent again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_core::command::{Command, Event, ExitStatus};
use tessera_core::model::{AttemptId, DrainReason, JobId, NodeId, NodeInfo, NodeState, ShardState};
use tessera_core::{State, Timestamp};
use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_proto::v1::server_message::Payload as Out;
use tessera_raft::StateRole;
use tokio::sync::mpsc;
use tonic::Status;

use crate::context::{Shared, now};
use crate::hub::Routed;
pub use crate::hub::{AgentHub, AgentTimeouts};

/// A pause of the liveness loop this long means the server was frozen or starved.
const FROZEN_GAP: Duration = Duration::from_secs(1);

/// Watches liveness on the leader and proposes overdue nodes down.
pub async fn liveness_loop(shared: Arc<Shared>) {
    let mut was_leader = false;
    let mut ticks = 0u64;
    let mut last_round = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ticks += 1;
        let gap = last_round.elapsed();
        last_round = Instant::now();
        let leader = shared.raft.status().role == StateRole::Leader;
        if leader && was_leader && gap >= FROZEN_GAP {
            // This loop did not run for a while: the process was frozen (a paused VM or
            // container, SIGSTOP) or starved. The agents' heartbeats went unread meanwhile, and
            // a successor may have been elected: judge no one on that silence. Count afresh
            // from now, as a new leader does; if this server was deposed it hears so shortly,
            // and its verdicts could not commit anyway (`write_as_leader`).
            tracing::warn!(
                gap_ms = gap.as_millis() as u64,
                "liveness loop resumed after a gap: judging agents afresh from now"
            );
            shared.agents.forgive();
            continue;
        }
        if leader != was_leader {
            // A new leader knows nothing of the agents yet: they reconnect, and it counts from
            // the moment it took office.
            if let Ok(mut l) = shared.agents.leader_since.lock() {
                *l = leader.then(Instant::now);
            }
            // A server that lost office forgets its agents (they reconnect to the new leader).
            // One that took office keeps the sessions opened since: it accepted them only
            // because it already led, up to 100 ms before this loop noticed, and clearing them
            // left those agents connected with no route for their assignments.
            if !leader {
                if let Ok(mut s) = shared.agents.sessions.lock() {
                    s.clear();
                }
                shared.agents.drop_routes();
                shared.live.clear();
            }
            was_leader = leader;
        }
        let connected = shared.agents.sessions.lock().map_or(0, |s| s.len());
        metrics::gauge!("tessera_agents_connected").set(connected as f64);
        if !leader {
            continue;
        }
        let Ok(up) = shared
            .raft
            .local(|n| {
                n.state_machine()
                    .state
                    .nodes()
                    .values()
                    .filter(|n| !matches!(n.state, NodeState::Down { .. }))
                    .map(|n| (n.id, n.registration, n.registered_at))
                    .collect::<Vec<_>>()
            })
            .await
        else {
            return;
        };
        if ticks.is_multiple_of(50) {
            end_cool_downs(&shared).await;
        }
        if ticks.is_multiple_of(100) {
            count_stragglers(&shared).await;
        }
        if ticks.is_multiple_of(10) {
            enforce_limits(&shared).await;
        }
        let ids: Vec<(NodeId, Timestamp)> = up.iter().map(|(n, _, at)| (*n, *at)).collect();
        for (node, reason) in shared.agents.overdue(&ids, now()) {
            tracing::warn!(%node, %reason, "marking node down");
            metrics::counter!("tessera_nodes_marked_down_total").increment(1);
            // Refused if the agent registered again after this verdict: it is back.
            let registration = up.iter().find(|(n, ..)| *n == node).map(|(_, r, _)| *r);
            if shared.write_as_leader(&Command::MarkNodeDown { node, reason, registration }).await.is_ok()
                && let Ok(mut s) = shared.agents.sessions.lock()
            {
                s.remove(&node);
            }
        }
    }
}

/// Stop what ran past its job's time limit, what is still on a node past its drain deadline,
/// and (hang detection) the running shards of jobs with a progress timeout whose step has not
/// moved for that long, as this leader has seen it since it took office: their gang restarts
/// from the checkpoint. One walk over the live attempts on the Raft thread; apply checks each
/// command again.
async fn enforce_limits(shared: &Shared) {
    let t = now();
    let found = shared
        .raft
        .local(move |n| {
            let state = &n.state_machine().state;
            let mut due = Vec::new();
            let mut watched = Vec::new();
            let mut timed_out = BTreeSet::new();
            for (attempt, r) in state.live_attempts() {
                if !timed_out.contains(&r.job) && state.past_time_limit(r.job, *attempt, t) {
                    timed_out.insert(r.job);
                    due.push(Command::TimeLimit { job: r.job, attempt: *attempt });
                }
                let Some(job) = state.job(r.job) else { continue };
                let Some(timeout) = job.spec.progress_timeout_secs else { continue };
                let shard = &job.shards[r.shard as usize];
                if let Some(a) = shard.attempt.as_ref().filter(|_| shard.state == ShardState::Running) {
                    watched.push((r.job, *attempt, a.started_at.unwrap_or(a.assigned_at).0, timeout));
                }
            }
            for node in state.nodes().values() {
                if matches!(node.state, NodeState::Draining { deadline: Some(d), .. } if d <= t)
                    && !state.past_drain_deadline(node.id, t).is_empty()
                {
                    due.push(Command::DrainDeadline { node: node.id });
                }
            }
            (due, watched)
        })
        .await;
    let Ok((mut due, watched)) = found else { return };
    // The earliest time this leader can vouch for: it saw no heartbeat before taking office.
    let office = shared
        .agents
        .leader_since
        .lock()
        .ok()
        .and_then(|l| *l)
        .map_or(t.0, |since| t.0.saturating_sub(since.elapsed().as_millis() as u64));
    let mut stalled: std::collections::BTreeMap<JobId, Vec<AttemptId>> = std::collections::BTreeMap::new();
    for (job, attempt, start, timeout) in watched {
        let last = start.max(office).max(shared.live.stepped_at(attempt.0).unwrap_or(0));
        if t.0.saturating_sub(last) > timeout.saturating_mul(1000) {
            stalled.entry(job).or_default().push(attempt);
        }
    }
    for (job, attempts) in stalled {
        tracing::warn!(%job, ranks = attempts.len(), "shards made no progress within the job's timeout: restarting the gang");
        due.push(Command::Stalled { job, attempts });
    }
    for cmd in due {
        // A stall is judged from this leader's own view of the heartbeats: only it may say so.
        let written = match &cmd {
            Command::Stalled { .. } => shared.write_as_leader(&cmd).await,
            _ => shared.write(&cmd).await,
        };
        match written {
            Ok(_) => tracing::info!(command = cmd.kind(), "limit enforced"),
            Err(e) => tracing::debug!(command = cmd.kind(), error = %e.message(), "limit not enforced"),
        }
    }
}

/// `tessera_stragglers`: running shards whose step lags their gang's median (see
/// `live::mark_stragglers`).
async fn count_stragglers(shared: &Shared) {
    let running = shared
        .raft
        .local(|n| {
            let state = &n.state_machine().state;
            let mut by_job: std::collections::BTreeMap<JobId, Vec<u64>> = std::collections::BTreeMap::new();
            for (attempt, r) in state.live_attempts() {
                let running = state
                    .job(r.job)
                    .is_some_and(|j| j.shards[r.shard as usize].state == tessera_core::model::ShardState::Running);
                if running {
                    by_job.entry(r.job).or_default().push(attempt.0);
                }
            }
            by_job.into_values().filter(|a| a.len() > 1).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
    let mut count = 0usize;
    for gang in running {
        let mut shards: Vec<v1::Shard> = gang
            .iter()
            .map(|a| v1::Shard {
                state: v1::ShardState::Running as i32,
                step: shared.live.step(*a).unwrap_or(0),
                ..Default::default()
            })
            .collect();
        crate::live::mark_stragglers(&mut shards);
        count += shards.iter().filter(|s| s.straggler).count();
    }
    metrics::gauge!("tessera_stragglers").set(count as f64);
}

/// Put back into placement the GPUs whose cool-down after a hardware fault has ended (see
/// `tessera_core::xid`); apply checks the time again, so a late command changes nothing.
async fn end_cool_downs(shared: &Shared) {
    let t = now();
    let ended = shared
        .raft
        .local(move |n| {
            let mut out = Vec::new();
            for node in n.state_machine().state.nodes().values() {
                for g in &node.gpus {
                    if matches!(g.health, tessera_core::model::GpuHealth::Unhealthy { until: Some(u), .. } if u <= t) {
                        out.push((node.id, g.index));
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default();
    for (node, gpu) in ended {
        let reason = "its cool-down after a hardware fault ended".to_string();
        let cmd = Command::SetGpuHealth { node, gpu, healthy: true, reason, xid: None, cool_down: true };
        if let Err(e) = shared.write(&cmd).await {
            tracing::debug!(%node, gpu, error = %e.message(), "cool-down not ended");
        } else {
            tracing::info!(%node, gpu, "GPU back in placement after its cool-down");
        }
    }
}

fn stop_reason(r: tessera_core::model::StopReason) -> v1::StopReason {
    v1::StopReason::from(r)
}

/// The job's own environment, and for an array element its index and array.
fn shard_env(j: &tessera_core::model::Job) -> std::collections::BTreeMap<String, String> {
    let mut env = j.spec.env.clone();
    if let Some(e) = j.element_of {
        env.insert("TESSERA_ARRAY_INDEX".into(), e.index.to_string());
        env.insert("TESSERA_ARRAY_JOB_ID".into(), e.array.0.to_string());
    }
    env
}

/// The assignment of `attempt` to `node` (a live attempt's assignment message), if that
/// attempt is still live there.
fn assign_message(state: &State, hub: &AgentHub, attempt: AttemptId, node: NodeId) -> Option<v1::ServerMessage> {
    let (j, s) = state.attempt(attempt)?;
    let (job, shard) = (j.id, s.index);
    let a = s.attempt.as_ref().filter(|a| a.id == attempt && a.node == node && s.state == ShardState::Assigned)?;
    let spec = &j.spec;
    let per_shard = spec.launch.processes_per_shard(spec.resources.gpus);
    let master_node = j.shards.first().and_then(|s0| s0.attempt.as_ref()).map(|a0| a0.node)?;
    let master_addr = hub
        .address(master_node)
        .map(|a| a.rsplit_once(':').map_or(a.clone(), |(h, _)| h.to_string()))
        .or_else(|| state.node(master_node).map(|n| n.info.name.clone()))
        .unwrap_or_default();
    Some(v1::ServerMessage {
        payload: Some(Out::AssignShard(v1::AssignShard {
            job_id: job.0,
            shard_index: shard,
            attempt_id: a.id.0,
            attempt: a.number,
            gpus: a.gpus.clone(),
            command: spec.command.clone(),
            env: shard_env(j),
            launch: Some(v1::LaunchEnv {
                master_addr,
                // The port shard 0's attempt holds on its node (no other live gang there has
                // it); an older state without one: one per job, as before.
                master_port: j
                    .shards
                    .first()
                    .and_then(|s0| s0.attempt.as_ref())
                    .and_then(|a0| a0.port)
                    .map_or(29_500 + (job.0 % 2_000) as u32, u32::from),
                // Per-GPU: `rank` is the shard's first process; the agent adds the local index.
                world_size: spec.shards.saturating_mul(per_shard),
                rank: shard.saturating_mul(per_shard),
                node_rank: shard,
                nnodes: spec.shards,
                local_rank: 0,
                num_shards: spec.shards,
            }),
            checkpoint_dir: spec.checkpoint_dir.clone().unwrap_or_default(),
            resume_from: j.resume_point(shard).map(|c| c.uri.clone()),
            checkpoint_signal: spec.stop.signal.clone(),
            checkpoint_grace_ms: spec.stop.checkpoint_grace_secs * 1000,
            term_grace_ms: spec.stop.term_grace_secs * 1000,
            job_name: spec.name.clone(),
            tenant: spec.tenant.clone(),
            launch_mode: v1::LaunchMode::from(spec.launch) as i32,
        })),
    })
}

fn stop_message(
    state: &State,
    job: JobId,
    attempt: AttemptId,
    reason: tessera_core::model::StopReason,
) -> v1::ServerMessage {
    let stop = state.job(job).map(|j| j.spec.stop.clone()).unwrap_or_default();
    let (mut checkpoint, mut term) = (stop.checkpoint_grace_secs * 1000, stop.term_grace_secs * 1000);
    // A node that goes away at a deadline (a spot notice): the ladder must end before it.
    let deadline = state.attempt(attempt).and_then(|(_, s)| {
        let node = state.node(s.attempt.as_ref()?.node)?;
        match node.state {
            tessera_core::model::NodeState::Draining { deadline: Some(d), .. } => Some(d),
            _ => None,
        }
    });
    if let Some(d) = deadline {
        (checkpoint, term) = fit_grace(checkpoint, term, d.since(now()).saturating_sub(STOP_MARGIN_MS));
    }
    v1::ServerMessage {
        payload: Some(Out::StopShard(v1::StopShard {
            attempt_id: attempt.0,
            reason: stop_reason(reason) as i32,
            checkpoint_grace_ms: checkpoint,
            term_grace_ms: term,
            message: format!("{reason:?}"),
        })),
    }
}

/// Time kept free before a node's deadline when its shards' stop ladder is shortened.
const STOP_MARGIN_MS: u64 = 5_000;

/// The checkpoint and term graces shrunk in proportion to fit in `left` milliseconds.
pub fn fit_grace(checkpoint: u64, term: u64, left: u64) -> (u64, u64) {
    let total = checkpoint + term;
    if total <= left {
        return (checkpoint, term);
    }
    let c = (u128::from(checkpoint) * u128::from(left) / u128::from(total.max(1))) as u64;
    (c, left - c)
}

/// What a (re)connecting agent must be told, from the state and the attempts it runs.
struct Reconcile {
    forget: Vec<u64>,
    lost: Vec<AttemptId>,
    resend: Vec<AttemptId>,
    stop: Vec<(JobId, AttemptId, tessera_core::model::StopReason)>,
    drain: Option<v1::Drain>,
}

fn reconcile(state: &State, node: NodeId, running: &BTreeSet<u64>) -> Reconcile {
    let mut r = Reconcile { forget: Vec::new(), lost: Vec::new(), resend: Vec::new(), stop: Vec::new(), drain: None };
    let mut live_here = BTreeSet::new();
    for id in state.live_attempts_on(node) {
        let Some((job, shard)) = state.attempt(id) else { continue };
        let Some(a) = shard.attempt.as_ref().filter(|a| a.node == node) else { continue };
        live_here.insert(id.0);
        match (running.contains(&id.0), shard.state) {
            (true, ShardState::Stopping(reason)) => r.stop.push((job.id, a.id, reason)),
            (true, _) => {}
            (false, ShardState::Assigned) => r.resend.push(id),
            (false, _) => r.lost.push(id),
        }
    }
    r.forget = running.iter().copied().filter(|a| !live_here.contains(a)).collect();
    r.drain =
        state.node(node).filter(|n| matches!(n.state, NodeState::Draining { .. })).and_then(|n| drain_message(n.state));
    r
}

/// What the agent is told of its node's state (nothing for Down: it is not connected).
fn drain_message(state: NodeState) -> Option<v1::Drain> {
    match state {
        NodeState::Draining { reason, deadline } => Some(v1::Drain {
            draining: true,
            deadline_unix_ms: deadline.map(|d| d.0),
            reason: v1::DrainReason::from(reason) as i32,
        }),
        NodeState::Ready => Some(v1::Drain {
            draining: false,
            deadline_unix_ms: None,
            reason: v1::DrainReason::from(DrainReason::Operator) as i32,
        }),
        NodeState::Down { .. } => None,
    }
}

fn ack(seq: u64, result: Result<(), Status>) -> v1::ServerMessage {
    let (rejected, reason) = match result {
        Ok(()) => (false, String::new()),
        Err(s) => (true, s.message().to_string()),
    };
    v1::ServerMessage { payload: Some(Out::Ack(v1::Ack { seq, rejected, reason })) }
}

fn not_leader(shared: &Shared) -> v1::ServerMessage {
    let s = shared.raft.status();
    let address = shared.transport.peers().get(&s.leader).cloned().unwrap_or_default();
    v1::ServerMessage {
        payload: Some(Out::NotLeader(v1::NotLeader {
            leader: Some(v1::LeaderHint { leader_id: (s.leader != 0).then_some(s.leader), leader_address: address }),
        })),
    }
}

/// Run one agent session; returns the stream of messages to the agent.
pub async fn session(
    shared: Arc<Shared>,
    who: tessera_core::acl::Principal,
    mut inbound: tonic::Streaming<v1::AgentMessage>,
) -> Result<mpsc::Receiver<Result<v1::ServerMessage, Status>>, Status> {
    let (tx, rx) = mpsc::channel(1024);
    if shared.raft.status().role != StateRole::Leader {
        let _ = tx.send(Ok(not_leader(&shared))).await;
        return Ok(rx);
    }
    let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("the stream ended before Register"))?;
    let Some(In::Register(reg)) = first.payload else {
        return Err(Status::invalid_argument("payload: the first message of a session must be Register"));
    };
    let info = NodeInfo::try_from(&reg).map_err(Status::from)?;
    // An agent's certificate names its node: it registers that node and no other.
    shared.auth.authorize(&who, tessera_core::acl::Rpc::AgentSession, tessera_core::acl::Resource::Node(&info.name))?;
    let name = info.name.clone();
    // A known node counts as heard from before its registration is even proposed, so the
    // liveness loop cannot judge it down in between.
    let known = name.clone();
    if let Ok(Some(id)) =
        shared.read(v1::ReadConsistency::Stale as i32, move |s| s.node_by_name(&known).map(|n| n.id)).await
    {
        shared.agents.open(id, reg.advertise_addr.clone());
    }
    shared.write(&Command::RegisterNode { info }).await?;
    let node = shared
        .read(0, move |s| s.node_by_name(&name).map(|n| n.id))
        .await?
        .ok_or_else(|| Status::internal("the node registered but is not in the state"))?;
    let running: BTreeSet<u64> = reg.running_attempts.iter().map(|a| a.attempt_id).collect();
    let generation = shared.agents.open(node, reg.advertise_addr.clone());
    // Route events here before reconciling so nothing applied in between is missed (the
    // session sends an assignment once; the agent also drops duplicates by attempt id).
    let events = shared.agents.add_route(node, generation);
    let hub = shared.clone();
    let (first_msgs, lost) = shared
        .read(0, move |s| {
            let r = reconcile(s, node, &running);
            let mut msgs = Vec::new();
            if !r.forget.is_empty() {
                msgs.push(v1::ServerMessage {
                    payload: Some(Out::ForgetAttempts(v1::ForgetAttempts {
                        attempt_ids: r.forget.clone(),
                        reason: "the scheduler no longer runs these attempts here".into(),
                    })),
                });
            }
            for (job, attempt, reason) in &r.stop {
                msgs.push(stop_message(s, *job, *attempt, *reason));
            }
            for attempt in &r.resend {
                msgs.extend(assign_message(s, &hub.agents, *attempt, node));
            }
            if let Some(d) = r.drain {
                msgs.push(v1::ServerMessage { payload: Some(Out::Drain(d)) });
            }
            let sent: BTreeSet<AttemptId> = r.resend.iter().copied().collect();
            ((msgs, sent), r.lost)
        })
        .await?;
    let (msgs, sent) = first_msgs;
    let status = shared.raft.status();
    let t = shared.agents.timeouts;
    let registered = v1::ServerMessage {
        payload: Some(Out::Registered(v1::Registered {
            node_id: node.0,
            heartbeat_interval_ms: t.heartbeat.as_millis() as u64,
            fence_timeout_ms: t.fence.as_millis() as u64,
            leader_id: status.id,
            term: status.term,
            server_time_unix_ms: now().0,
        })),
    };
    let _ = tx.send(Ok(registered)).await;
    for m in msgs {
        let _ = tx.send(Ok(m)).await;
    }
    // Attempts the state thinks run here but the agent does not have: lost with the node.
    for attempt in lost {
        let cmd = Command::ShardExited {
            attempt,
            exit: ExitStatus { code: None, signal: None },
            node_fault: true,
            message: Some("the agent no longer had this attempt when it reconnected".into()),
        };
        let _ = shared.write(&cmd).await;
    }
    tracing::info!(%node, generation, "agent session open");
    tokio::spawn(push_events(events, tx.clone(), sent));
    tokio::spawn(read_reports(shared, node, generation, inbound, tx));
    Ok(rx)
}

/// Forward what the router built for this session to its agent, each assignment once.
async fn push_events(
    mut events: mpsc::UnboundedReceiver<Routed>,
    tx: mpsc::Sender<Result<v1::ServerMessage, Status>>,
    mut sent: BTreeSet<AttemptId>,
) {
    while let Some(msgs) = events.recv().await {
        for (key, m) in msgs {
            if let Some(k) = key
                && !sent.insert(k)
            {
                continue;
            }
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
    }
    // The router dropped this session (this server is no longer the leader, or a newer
    // session of the node replaced it): the agent reconnects and is reconciled.
    let _ = tx.send(Err(Status::unavailable("session feed ended; reconnect"))).await;
}

/// The node an event must be told to, if any.
fn event_node(e: &Event) -> Option<NodeId> {
    match e {
        Event::ShardAssigned { node, .. }
        | Event::StopRequested { node, .. }
        | Event::NodeStateChanged { node, .. }
        | Event::GpuHealthChanged { node, .. } => Some(*node),
        _ => None,
    }
}

/// The messages that tell agents of these events, built against the current state.
fn event_messages(s: &State, hub: &AgentHub, events: Vec<Event>) -> HashMap<NodeId, Routed> {
    let mut out: HashMap<NodeId, Routed> = HashMap::new();
    for e in events {
        let Some(node) = event_node(&e) else { continue };
        let m = match e {
            Event::ShardAssigned { attempt, .. } => assign_message(s, hub, attempt, node).map(|m| (Some(attempt), m)),
            Event::StopRequested { job, attempt, reason, .. } => Some((None, stop_message(s, job, attempt, reason))),
            Event::NodeStateChanged { state, .. } => {
                drain_message(state).map(|d| (None, v1::ServerMessage { payload: Some(Out::Drain(d)) }))
            }
            Event::GpuHealthChanged { gpu, healthy: true, .. } => Some((
                None,
                v1::ServerMessage {
                    payload: Some(Out::GpuHealthCleared(v1::GpuHealthCleared { gpu_indices: vec![gpu] })),
                },
            )),
            _ => None,
        };
        if let Some(m) = m {
            out.entry(node).or_default().push(m);
        }
    }
    out
}

/// Most applied entries the router takes in before it builds their messages.
const ROUTE_BATCH: usize = 1024;

/// The one reader of the applied events for agents (a channel of its own, which never drops
/// an entry): it picks the events each connected node must hear of, builds their messages in
/// one visit to the state per batch of entries, and hands them to the nodes' sessions. (One
/// broadcast subscriber per session would wake every session for every entry: 10,000 wakeups
/// per entry at fleet scale, and a session that fell behind lost its events.)
pub async fn route_loop(shared: Arc<Shared>, mut applied: mpsc::UnboundedReceiver<Arc<crate::sm::Applied>>) {
    loop {
        let Some(first) = applied.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < ROUTE_BATCH {
            match applied.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let routed = shared.agents.routed_nodes();
        let mine: Vec<Event> = batch
            .iter()
            .flat_map(|a| a.events.iter())
            .filter(|e| event_node(e).is_some_and(|n| routed.contains(&n)))
            .cloned()
            .collect();
        if mine.is_empty() {
            continue;
        }
        let hub = shared.clone();
        let Ok(msgs) = shared.raft.local(move |n| event_messages(&n.state_machine().state, &hub.agents, mine)).await
        else {
            return;
        };
        shared.agents.deliver(msgs);
    }
}

/// Keep a chunk of output on the leader (never in the log).
async fn log_chunk(shared: &Shared, c: v1::LogChunk) -> Result<(), Status> {
    if c.data.len() > 4 * 1024 * 1024 {
        return Err(Status::invalid_argument("data: a log chunk is at most 4 MiB"));
    }
    let owner = match shared.logs.owner(c.attempt_id) {
        Some(o) => o,
        None => {
            let id = AttemptId(c.attempt_id);
            shared
                .raft
                .local(move |n| {
                    n.state_machine().state.attempt(id).and_then(|(j, s)| {
                        s.attempt.as_ref().map(|a| crate::logs::Owner { job: j.id, shard: s.index, attempt: a.number })
                    })
                })
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .ok_or_else(|| Status::failed_precondition(format!("attempt {} is not live", c.attempt_id)))?
        }
    };
    shared.logs.append(c.attempt_id, owner, c.stream, c.offset, &c.data);
    Ok(())
}

/// The command an agent's report of `node` becomes in the log: a shard started or exited, a
/// checkpoint, a GPU's health, a spot notice. None for what the session handles itself
/// (heartbeats, log chunks, a second Register).
pub fn report_command(node: NodeId, report: In) -> Option<Command> {
    Some(match report {
        In::ShardStarted(s) => Command::ShardStarted { attempt: AttemptId(s.attempt_id) },
        In::ShardExited(e) => Command::ShardExited {
            attempt: AttemptId(e.attempt_id),
            exit: match e.termination {
                Some(v1::shard_exited::Termination::ExitCode(c)) => ExitStatus { code: Some(c), signal: None },
                Some(v1::shard_exited::Termination::Signal(s)) => ExitStatus { code: None, signal: Some(s) },
                None => ExitStatus { code: None, signal: None },
            },
            node_fault: e.node_fault,
            // Cut, not refused: a refused exit would leave its attempt live forever.
            message: (!e.message.is_empty()).then(|| {
                let mut m = e.message;
                tessera_core::timeline::truncate(&mut m, 4096);
                m
            }),
        },
        In::CheckpointReport(c) => {
            Command::RecordCheckpoint { attempt: AttemptId(c.attempt_id), step: c.step, uri: c.uri }
        }
        In::GpuHealthReport(g) => Command::SetGpuHealth {
            node,
            gpu: g.gpu_index,
            healthy: g.healthy,
            reason: g.reason,
            xid: g.xid,
            cool_down: false,
        },
        In::SpotNotice(n) => Command::DrainNode {
            node,
            reason: DrainReason::SpotInterruption,
            deadline: (n.deadline_unix_ms > 0).then_some(Timestamp(n.deadline_unix_ms)),
        },
        In::Register(_) | In::Heartbeat(_) | In::LogChunk(_) | In::LogRead(_) => return None,
    })
}

/// Turn the agent's reports into commands, acknowledging each once applied.
async fn read_reports(
    shared: Arc<Shared>,
    node: NodeId,
    generation: u64,
    mut inbound: tonic::Streaming<v1::AgentMessage>,
    tx: mpsc::Sender<Result<v1::ServerMessage, Status>>,
) {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        if !shared.agents.current(node, generation) {
            break;
        }
        shared.agents.seen(node, generation);
        if shared.raft.status().role != StateRole::Leader {
            let _ = tx.send(Ok(not_leader(&shared))).await;
            break;
        }
        let seq = msg.seq;
        let cmd = match msg.payload {
            Some(In::Heartbeat(hb)) => {
                shared.live.heartbeat(node, hb, now().0);
                let _ = tx.send(Ok(ack(seq, Ok(())))).await;
                continue;
            }
            None => {
                let _ = tx.send(Ok(ack(seq, Ok(())))).await;
                continue;
            }
            Some(In::Register(_)) => {
                let _ = tx.send(Ok(ack(seq, Err(Status::invalid_argument("already registered on this stream"))))).await;
                continue;
            }
            Some(In::LogChunk(c)) => {
                let result = log_chunk(&shared, c).await;
                let _ = tx.send(Ok(ack(seq, result))).await;
                continue;
            }
            Some(In::LogRead(r)) => {
                shared.agents.log_read(node, r);
                let _ = tx.send(Ok(ack(seq, Ok(())))).await;
                continue;
            }
            Some(report) => match report_command(node, report) {
                Some(cmd) => cmd,
                None => continue,
            },
        };
        let result = shared.write(&cmd).await.map(|_| ());
        if result.as_ref().is_err_and(|s| s.code() == tonic::Code::Unavailable) {
            let _ = tx.send(Err(Status::unavailable("the cluster lost its leader; reconnect"))).await;
            break;
        }
        if tx.send(Ok(ack(seq, result))).await.is_err() {
            break;
        }
    }
    shared.agents.closed(node, generation);
    shared.agents.remove_route(node, generation);
    tracing::info!(%node, generation, "agent session closed");
}

#[cfg(test)]
mod grace_tests {
    #[test]
    fn the_stop_ladder_shrinks_to_fit_a_deadline() {
        use super::fit_grace;
        assert_eq!(fit_grace(60_000, 30_000, 200_000), (60_000, 30_000), "room enough");
        assert_eq!(fit_grace(60_000, 30_000, 90_000), (60_000, 30_000));
        // AWS's two minutes less the margin, against 60 s + 30 s: kept; Azure's 30 s: shrunk.
        assert_eq!(fit_grace(60_000, 30_000, 25_000), (16_666, 8_334));
        assert_eq!(fit_grace(60_000, 30_000, 0), (0, 0));
        assert_eq!(fit_grace(0, 0, 0), (0, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_s_long_message_is_cut_not_refused() {
        let long = "x".repeat(10_000);
        let report = In::ShardExited(v1::ShardExited { attempt_id: 1, message: long, ..Default::default() });
        let Some(Command::ShardExited { message: Some(m), .. }) = report_command(NodeId(1), report) else {
            panic!("expected an exit")
        };
        assert_eq!(m.len(), 4096);
    }
}
