//! The agent's side of the AgentService stream as a pure state machine: what `tessera-core`'s
//! `State` is to the servers. [`Protocol`] does no IO and reads no clock: every method that
//! depends on time takes `now`, randomness comes in as a `u64`, and the methods answer with
//! [`Action`]s for the IO loop in [`crate::agent`] to perform.
//!
//! It owns:
//! - the outbox: reports (starts, exits, checkpoints, GPU health, log chunks, spot notices)
//!   numbered in order, kept until acknowledged and sent again after a reconnect (log chunks
//!   beyond [`LOG_OUTBOX_BYTES`] are dropped then);
//! - the attempts running here and those whose exit is not acknowledged yet (registration lists
//!   both), and the attempt ids started here (an attempt never runs twice);
//! - liveness: the last acknowledgement, the fence timeout (nothing acknowledged for that long
//!   while shards run: [`Action::Fence`], once per silence), the heartbeat schedule, and a
//!   silence of half the fence ending the session (a frozen leader is left while there is time
//!   to find its successor);
//! - the choice of the next server, leader hints, and the waits between tries (doubling with
//!   jitter, capped well inside the fence);
//! - Azure Scheduled Events waiting for every shard to stop and every report to be acknowledged.
//!
//! [`StopLadder`] is the stop ladder's timing: which signal when. `shard.rs` sends the signals.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_proto::v1::server_message::Payload as Out;

/// The fence timeout before a leader has said otherwise.
pub const DEFAULT_FENCE: Duration = Duration::from_secs(3);
/// The shortest fence timeout the agent accepts from a leader.
pub const MIN_FENCE: Duration = Duration::from_secs(1);
/// The shortest heartbeat interval the agent accepts from a leader.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Heartbeat intervals without any acknowledgement after which a session is taken for dead, at
/// most (see [`Protocol::silence_limit`]).
pub const SILENT_HEARTBEATS: u32 = 3;
/// The first wait after every server has failed once; it doubles up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between rounds of tries. Well under the fence timeout, so an agent that
/// lost its leader finds the next one before it has to fence itself.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How soon to ask again while the servers hold an election.
pub const ELECTION_RETRY: Duration = Duration::from_millis(200);
/// Most output kept waiting for acknowledgement across a reconnect.
pub const LOG_OUTBOX_BYTES: u64 = 8 * 1024 * 1024;
/// How many started attempt ids are remembered (so that none runs twice).
const RAN_REMEMBERED: usize = 10_000;
/// The shortest connect and registration wait per server.
const MIN_CONNECT_LIMIT: Duration = Duration::from_secs(1);

/// What the IO loop is to do, in the order returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this report. It stays in the outbox until acknowledged, so a failed send needs
    /// nothing: it goes again after the next registration.
    Send(v1::AgentMessage),
    /// Send this message (a heartbeat, a log read's answer), which is not kept: if it cannot be
    /// sent, the session is over.
    SendOnce(v1::AgentMessage),
    /// A heartbeat is due: build one (telemetry, progress) and hand it to
    /// [`Protocol::heartbeat`].
    Heartbeat,
    /// Start this assignment (it never ran here); then call [`Protocol::started`] or
    /// [`Protocol::start_failed`].
    Start(v1::AssignShard),
    /// Run the stop ladder of this running attempt.
    Stop { attempt: u64 },
    /// The servers no longer run these attempts here (they may run elsewhere): kill any of them
    /// still running at once, without a ladder. Nothing more is reported about them.
    Forget { attempts: Vec<u64> },
    /// Nothing was acknowledged for the fence timeout: kill these attempts at once. Their exits
    /// are reported as the node's fault.
    Fence { attempts: Vec<u64> },
    /// Read this output from disk and answer through [`Protocol::answer`].
    ReadLog(v1::ReadLog),
    /// Acknowledge this Azure Scheduled Event: no shard runs and every report is acknowledged.
    AckCloudEvent(String),
    /// End the session; then call [`Protocol::session_ended`].
    End(SessionEnd),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Try this address next (a leader hint).
    Redirect(String),
    /// The server could not be reached, or refused the session: try the next one.
    Unreachable,
    /// The server answered but knows of no leader: an election is under way.
    NoLeader,
    /// A registered session broke (the leader died or stepped down): try the next server now.
    Broken,
    /// Nothing was acknowledged for [`Protocol::silence_limit`]: a dead or frozen far end (a
    /// crashed host, a paused leader, a partition without a reset). Handled like `Broken`.
    Silent,
}

/// Where a leader hint points: a redirect, or an election under way.
pub fn not_leader(n: v1::NotLeader) -> SessionEnd {
    match n.leader.map(|l| l.leader_address).filter(|a| !a.is_empty()) {
        Some(a) => SessionEnd::Redirect(a),
        None => SessionEnd::NoLeader,
    }
}

/// A wait in `[d/2, d]` picked by `random`, so that a fleet of agents does not reconnect in
/// lockstep.
pub fn jittered(d: Duration, random: u64) -> Duration {
    let half = d.as_millis() as u64 / 2;
    Duration::from_millis(half + random % (half + 1))
}

/// The attempt a report is about.
pub fn report_attempt(p: &In) -> Option<u64> {
    match p {
        In::ShardStarted(s) => Some(s.attempt_id),
        In::ShardExited(e) => Some(e.attempt_id),
        In::CheckpointReport(c) => Some(c.attempt_id),
        In::LogChunk(l) => Some(l.attempt_id),
        _ => None,
    }
}

/// An attempt running here, as the protocol knows it.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    /// Killed by the fence: its exit is the node's fault, not the job's.
    fenced: bool,
}

/// The agent's side of the stream. See the module's documentation.
#[derive(Debug)]
pub struct Protocol {
    servers: Vec<String>,
    /// The last sequence number given out (reports, registrations, heartbeats, log reads).
    seq: u64,
    /// Reports not yet acknowledged, in order, by sequence number.
    outbox: VecDeque<(u64, In)>,
    /// Every message up to this number was handed out in this session.
    sent_up_to: u64,
    /// Attempts running here (started and not yet exited nor forgotten).
    running: BTreeMap<u64, Attempt>,
    /// Attempts that exited but whose exit is not acknowledged yet: still listed as running
    /// when registering, so a new leader waits for the exit report instead of declaring them
    /// lost. Value: (job, shard).
    finished: BTreeMap<u64, (u64, u32)>,
    /// Attempt ids this agent has started (recent ones).
    ran: VecDeque<u64>,
    /// Azure Scheduled Events to acknowledge once idle.
    awaiting_ack: Vec<String>,
    /// When the last acknowledgement (or registration) came.
    last_ack: Instant,
    fence: Duration,
    /// The acknowledgement after which the agent last fenced itself (once per silence).
    fenced_after: Option<Instant>,
    heartbeat: Duration,
    next_heartbeat: Instant,
    /// Servers tried so far, in turn.
    next_server: usize,
    redirect: Option<String>,
    backoff: Duration,
    /// Failed tries since the last registered session: every server is tried once before the
    /// agent waits, so one dead server never delays finding the live ones.
    misses: usize,
    redirects: usize,
    /// Sessions tried, registered or not.
    tries: u64,
    /// The server of the session being tried or held.
    current: Option<String>,
    /// Checkpoint reports the servers accepted, not yet taken.
    acked_checkpoints: Vec<(u64, u64)>,
    /// The server whose registered session went silent or broke: not tried again, even on a
    /// follower's (stale) hint, until the agent has registered elsewhere or has skipped it
    /// [`AVOID_SKIPS`] times. A frozen server still accepts TCP connections and then answers
    /// nothing, so trying it again costs a whole connect limit, the fence's length.
    avoid: Option<(String, usize)>,
}

/// The longest message an exit report carries.
pub const MAX_MESSAGE: usize = 1024;

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// How often the server just left is skipped before it may be tried again (it may have been
/// only slow, and be the leader still).
const AVOID_SKIPS: usize = 6;

impl Protocol {
    /// A protocol that will try `servers` in turn, created at `now` (the fence counts from it).
    pub fn new(servers: Vec<String>, now: Instant) -> Protocol {
        Protocol {
            servers,
            seq: 0,
            outbox: VecDeque::new(),
            sent_up_to: 0,
            running: BTreeMap::new(),
            finished: BTreeMap::new(),
            ran: VecDeque::new(),
            awaiting_ack: Vec::new(),
            last_ack: now,
            fence: DEFAULT_FENCE,
            fenced_after: None,
            heartbeat: Duration::from_secs(1),
            next_heartbeat: now,
            next_server: 0,
            redirect: None,
            backoff: BASE_BACKOFF,
            misses: 0,
            redirects: 0,
            tries: 0,
            current: None,
            avoid: None,
            acked_checkpoints: Vec::new(),
        }
    }

    // ---- Sessions and reconnects ----

    /// The address to try next: a leader hint if one came, else the next server in turn.
    /// `None` only without servers.
    pub fn next_address(&mut self) -> Option<String> {
        let mut addr = match self.redirect.take() {
            Some(a) => a,
            None => self.next_in_turn()?,
        };
        if let Some((avoided, skips)) = self.avoid.clone()
            && avoided == addr
            && skips < AVOID_SKIPS
            && self.servers.len() > 1
        {
            self.avoid = Some((avoided.clone(), skips + 1));
            addr = self.next_in_turn()?;
            if addr == avoided {
                addr = self.next_in_turn()?;
            }
        }
        self.tries += 1;
        self.current = Some(addr.clone());
        Some(addr)
    }

    fn next_in_turn(&mut self) -> Option<String> {
        let a = self.servers.get(self.next_server % self.servers.len().max(1))?.clone();
        self.next_server += 1;
        Some(a)
    }

    /// Whether the session being tried is not the agent's first (for the reconnect counter).
    pub fn is_reconnect(&self) -> bool {
        self.tries > 1
    }

    /// The longest wait on one server for the connection, the session and its registration:
    /// never longer than the fence, since the fence is checked between tries.
    pub fn connect_limit(&self) -> Duration {
        self.fence.max(MIN_CONNECT_LIMIT)
    }

    /// The first message of a new stream.
    pub fn register(&mut self, reg: v1::Register) -> v1::AgentMessage {
        self.seq += 1;
        v1::AgentMessage { seq: self.seq, payload: Some(In::Register(reg)) }
    }

    /// The leader accepted the registration at `now`: take its timeouts, count the fence from
    /// now, make a heartbeat due at once, drop queued output beyond [`LOG_OUTBOX_BYTES`] (so an
    /// outage cannot grow the outbox without limit) and send every report not yet acknowledged
    /// again, in order.
    pub fn registered(&mut self, r: &v1::Registered, now: Instant) -> Vec<Action> {
        self.fence = Duration::from_millis(r.fence_timeout_ms).max(MIN_FENCE);
        self.avoid = None;
        self.heartbeat = Duration::from_millis(r.heartbeat_interval_ms).max(MIN_HEARTBEAT);
        self.last_ack = now;
        self.next_heartbeat = now;
        let mut kept = 0u64;
        self.outbox.retain(|(_, p)| match p {
            In::LogChunk(c) => {
                kept += c.data.len() as u64;
                kept <= LOG_OUTBOX_BYTES
            }
            _ => true,
        });
        let resend = self
            .outbox
            .iter()
            .map(|(seq, p)| Action::Send(v1::AgentMessage { seq: *seq, payload: Some(p.clone()) }))
            .collect();
        self.sent_up_to = self.seq;
        resend
    }

    /// A session ended (`jitter`: a random number). Returns how long to wait before the next
    /// try (zero: at once):
    /// - a redirect is followed at once, unless servers disagree on the leader for more
    ///   redirects in a row than there are servers (then an election wait);
    /// - a broken or silent session: the next server at once, and the backoff starts over;
    /// - no leader: an election wait, [`ELECTION_RETRY`] jittered;
    /// - unreachable: once every server failed in turn, the backoff jittered; it doubles up to
    ///   [`MAX_BACKOFF`].
    pub fn session_ended(&mut self, end: SessionEnd, jitter: u64) -> Duration {
        match end {
            SessionEnd::Redirect(a) => {
                self.redirects += 1;
                self.redirect = Some(a);
                if self.redirects > self.servers.len() {
                    self.redirects = 0;
                    return jittered(ELECTION_RETRY, jitter);
                }
                Duration::ZERO
            }
            SessionEnd::Broken | SessionEnd::Silent => {
                self.avoid = self.current.clone().map(|a| (a, 0));
                self.backoff = BASE_BACKOFF;
                self.misses = 0;
                self.redirects = 0;
                Duration::ZERO
            }
            SessionEnd::NoLeader => jittered(ELECTION_RETRY, jitter),
            SessionEnd::Unreachable => {
                self.misses += 1;
                if self.misses.is_multiple_of(self.servers.len().max(1)) {
                    let wait = jittered(self.backoff, jitter);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return wait;
                }
                Duration::ZERO
            }
        }
    }

    // ---- Time ----

    /// When the next heartbeat is due (meaningful while registered).
    pub fn next_heartbeat(&self) -> Instant {
        self.next_heartbeat
    }

    /// How long a session may go without any acknowledgement before it is taken for dead:
    /// [`SILENT_HEARTBEATS`] intervals, but never more than half the fence. A leader that froze
    /// keeps its connections open (its kernel still answers TCP), so only this silence shows it;
    /// the agent must leave it, and find the new leader, well before its fence kills the shards.
    /// With the defaults (1 s heartbeats, 3 s fence): 1.5 s.
    pub fn silence_limit(&self) -> Duration {
        (self.heartbeat * SILENT_HEARTBEATS).min(self.fence / 2).max(self.heartbeat)
    }

    /// When [`Self::tick`] next has something to do: the next heartbeat, or the end of a silence.
    pub fn next_wake(&self) -> Instant {
        self.next_heartbeat.min(self.last_ack + self.silence_limit() + Duration::from_millis(1))
    }

    /// Time passed in a session: [`Action::Heartbeat`] when one is due. Heartbeats keep to
    /// their schedule: one late by several intervals is followed by the missed ones at once.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        if now.saturating_duration_since(self.last_ack) > self.silence_limit() {
            return vec![Action::End(SessionEnd::Silent)];
        }
        if now < self.next_heartbeat {
            return Vec::new();
        }
        self.next_heartbeat += self.heartbeat;
        vec![Action::Heartbeat]
    }

    /// Send a heartbeat: first the reports queued since the last send, then the heartbeat;
    /// then, if nothing was acknowledged for [`Self::silence_limit`], end the session
    /// (every message is acknowledged, so silence means a dead connection).
    pub fn heartbeat(&mut self, hb: v1::Heartbeat, now: Instant) -> Vec<Action> {
        let mut actions = self.answer(In::Heartbeat(hb));
        if now.saturating_duration_since(self.last_ack) > self.silence_limit() {
            actions.push(Action::End(SessionEnd::Silent));
        }
        actions
    }

    /// The self-fencing check (the watchdog calls it often): when shards run and nothing was
    /// acknowledged for the fence timeout, [`Action::Fence`] with every attempt not fenced yet,
    /// once per silence.
    pub fn check_fence(&mut self, now: Instant) -> Vec<Action> {
        let attempts: Vec<u64> = self.running.iter().filter(|(_, a)| !a.fenced).map(|(id, _)| *id).collect();
        if attempts.is_empty()
            || now.saturating_duration_since(self.last_ack) < self.fence
            || self.fenced_after == Some(self.last_ack)
        {
            return Vec::new();
        }
        self.fenced_after = Some(self.last_ack);
        for id in &attempts {
            if let Some(a) = self.running.get_mut(id) {
                a.fenced = true;
            }
        }
        vec![Action::Fence { attempts }]
    }

    /// When the fence would fire if nothing is acknowledged before.
    pub fn fence_deadline(&self) -> Instant {
        self.last_ack + self.fence
    }

    // ---- Messages ----

    /// A message from the leader, received at `now`.
    pub fn on_message(&mut self, m: v1::ServerMessage, now: Instant) -> Vec<Action> {
        match m.payload {
            Some(Out::Ack(a)) => {
                self.acked(a.seq, now, a.rejected);
                Vec::new()
            }
            Some(Out::AssignShard(a)) => {
                if self.running.contains_key(&a.attempt_id) || self.ran.contains(&a.attempt_id) {
                    return Vec::new();
                }
                self.ran.push_back(a.attempt_id);
                if self.ran.len() > RAN_REMEMBERED {
                    self.ran.pop_front();
                }
                vec![Action::Start(a)]
            }
            Some(Out::StopShard(s)) if self.running.contains_key(&s.attempt_id) => {
                vec![Action::Stop { attempt: s.attempt_id }]
            }
            Some(Out::ForgetAttempts(f)) => {
                for id in &f.attempt_ids {
                    self.running.remove(id);
                    self.finished.remove(id);
                    self.outbox.retain(|(_, p)| report_attempt(p) != Some(*id));
                }
                vec![Action::Forget { attempts: f.attempt_ids }]
            }
            Some(Out::NotLeader(n)) => vec![Action::End(not_leader(n))],
            Some(Out::ReadLog(r)) => vec![Action::ReadLog(r)],
            Some(Out::StopShard(_))
            | Some(Out::Drain(_))
            | Some(Out::GpuHealthCleared(_))
            | Some(Out::Registered(_))
            | None => Vec::new(),
        }
    }

    /// Any acknowledgement is a sign of life: the fence and the silence count from it. The
    /// acknowledged report (accepted or refused alike) leaves the outbox; an acknowledged exit
    /// is no longer listed at registration. An ack of nothing in the outbox changes nothing else.
    fn acked(&mut self, seq: u64, now: Instant, rejected: bool) {
        self.last_ack = now;
        if let Some(pos) = self.outbox.iter().position(|(s, _)| *s == seq) {
            match self.outbox.remove(pos) {
                Some((_, In::ShardExited(e))) => {
                    self.finished.remove(&e.attempt_id);
                }
                Some((_, In::CheckpointReport(c))) if !rejected => {
                    self.acked_checkpoints.push((c.attempt_id, c.step));
                }
                _ => {}
            }
        }
    }

    /// Checkpoints the servers accepted since the last call, as (attempt, step): the servers
    /// may resume from these, so only older ones may be pruned.
    pub fn take_acked_checkpoints(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.acked_checkpoints)
    }

    /// Queue a report; it goes with the next [`Self::flush`].
    pub fn queue(&mut self, p: In) {
        self.seq += 1;
        self.outbox.push_back((self.seq, p));
    }

    /// The reports queued since the last send, in order.
    pub fn flush(&mut self) -> Vec<Action> {
        let sent_up_to = self.sent_up_to;
        let out = self
            .outbox
            .iter()
            .filter(|(s, _)| *s > sent_up_to)
            .map(|(seq, p)| Action::Send(v1::AgentMessage { seq: *seq, payload: Some(p.clone()) }))
            .collect();
        self.sent_up_to = self.seq;
        out
    }

    /// Send a message that is not kept (a log read's answer): after what was queued before, so
    /// sequence numbers stay in order.
    pub fn answer(&mut self, p: In) -> Vec<Action> {
        let mut actions = self.flush();
        self.seq += 1;
        actions.push(Action::SendOnce(v1::AgentMessage { seq: self.seq, payload: Some(p) }));
        self.sent_up_to = self.seq;
        actions
    }

    // ---- Attempts ----

    /// An assigned attempt started: report it, and fence it if the leader goes silent.
    pub fn started(&mut self, attempt: u64, pid: u32) {
        self.queue(In::ShardStarted(v1::ShardStarted { attempt_id: attempt, pid, ..Default::default() }));
        self.running.entry(attempt).or_insert(Attempt { fenced: false });
    }

    /// An assigned attempt is getting ready to start (its checkpoint is downloading): it can be
    /// stopped, and the fence covers it, before it has started.
    pub fn preparing(&mut self, attempt: u64) {
        self.running.entry(attempt).or_insert(Attempt { fenced: false });
    }

    /// Whether the fence has fired for this attempt (an attempt still preparing must then not
    /// start).
    pub fn is_fenced(&self, attempt: u64) -> bool {
        self.running.get(&attempt).is_some_and(|a| a.fenced)
    }

    /// An assigned attempt could not start: report it as exit code 127.
    pub fn start_failed(&mut self, attempt: u64, message: String) {
        self.running.remove(&attempt);
        // The servers refuse an exit whose message is over 4 KiB, and an exit refused is an
        // attempt that never ends: an object store's error can carry a whole response body.
        let message = bounded(message, MAX_MESSAGE);
        self.queue(In::ShardExited(v1::ShardExited {
            attempt_id: attempt,
            termination: Some(v1::shard_exited::Termination::ExitCode(127)),
            message,
            ..Default::default()
        }));
    }

    /// A running attempt exited: report it (as the node's fault if the fence killed it), and
    /// list it at registration until the report is acknowledged. Queue its last output and
    /// checkpoints before.
    pub fn exited(&mut self, attempt: u64, job: u64, shard: u32, termination: Option<v1::shard_exited::Termination>) {
        let fenced = self.running.remove(&attempt).is_some_and(|a| a.fenced);
        self.finished.insert(attempt, (job, shard));
        self.queue(In::ShardExited(v1::ShardExited {
            attempt_id: attempt,
            termination,
            node_fault: fenced,
            message: if fenced {
                "stopped by the agent: no leader answered for the fence timeout".into()
            } else {
                String::new()
            },
            ..Default::default()
        }));
    }

    /// Whether the attempt runs here.
    pub fn is_running(&self, attempt: u64) -> bool {
        self.running.contains_key(&attempt)
    }

    /// Attempts that exited but whose exit is not acknowledged yet: attempt -> (job, shard).
    pub fn finished(&self) -> &BTreeMap<u64, (u64, u32)> {
        &self.finished
    }

    /// Reports waiting for an acknowledgement.
    pub fn unacknowledged(&self) -> usize {
        self.outbox.len()
    }

    // ---- Cloud events ----

    /// An Azure Scheduled Event to acknowledge once every shard stopped and every report
    /// (exits, last checkpoints, last output) is acknowledged: then the host may go at once.
    pub fn acknowledge_when_idle(&mut self, event_id: String) {
        self.awaiting_ack.push(event_id);
    }

    /// The events whose acknowledgement is now due.
    pub fn idle_acks(&mut self) -> Vec<Action> {
        if !self.running.is_empty() || !self.finished.is_empty() || !self.outbox.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut self.awaiting_ack).into_iter().map(Action::AckCloudEvent).collect()
    }
}

/// A rung of the stop ladder: the signal sent to the shard's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// The job's checkpoint signal.
    Checkpoint,
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
}

/// One step of the stop ladder: send `rung`'s signal now, then wait for the exit until
/// `wait_until` (none after SIGKILL) before asking [`StopLadder::next`] again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LadderStep {
    pub rung: Rung,
    pub wait_until: Option<Instant>,
}

/// The stop ladder's timing: the checkpoint signal (unless the job has none), up to the
/// checkpoint grace; SIGTERM, up to the term grace; SIGKILL. Each grace counts from its signal;
/// once the shard has exited the ladder is over.
#[derive(Debug, Clone)]
pub struct StopLadder {
    rungs: VecDeque<(Rung, Option<Duration>)>,
}

impl StopLadder {
    /// The ladder of a shard with (or without) a checkpoint signal.
    pub fn new(checkpoint_signal: bool, checkpoint_grace: Duration, term_grace: Duration) -> StopLadder {
        let mut rungs = VecDeque::new();
        if checkpoint_signal {
            rungs.push_back((Rung::Checkpoint, Some(checkpoint_grace)));
        }
        rungs.push_back((Rung::Term, Some(term_grace)));
        rungs.push_back((Rung::Kill, None));
        StopLadder { rungs }
    }

    /// The next step at `now`; `None` once the shard has exited or SIGKILL was sent.
    pub fn next(&mut self, now: Instant, exited: bool) -> Option<LadderStep> {
        if exited {
            self.rungs.clear();
            return None;
        }
        let (rung, grace) = self.rungs.pop_front()?;
        Some(LadderStep { rung, wait_until: grace.map(|g| now + g) })
    }
}
