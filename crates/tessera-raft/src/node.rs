//! The driver around raft-rs's `RawNode`: tick, step, propose, read, and one `Ready` cycle at a
//! time (persist, flush once, send, apply, advance).
//!
//! It is synchronous and owns no thread, socket or clock: the caller ticks it on a timer,
//! delivers the messages it receives and sends the ones it is handed. The server runs it in a
//! task over gRPC; the tests run several in one thread over an in-memory network.

use std::collections::{BTreeMap, VecDeque};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole};

use crate::storage::{LogStore, StoreError};

/// What the replicated log drives: applied in log order on every server.
pub trait StateMachine: Send + 'static {
    /// What applying an entry gives back to the server that proposed it.
    type Output: Send + Default + 'static;
    /// Apply the entry at `index`; the result goes back to the proposer. Undecodable entries
    /// must not panic: every server reaches the same verdict on them.
    fn apply(&mut self, index: u64, data: &[u8]) -> Self::Output;
    /// The whole state, for a snapshot taken at the last applied index.
    fn snapshot(&self) -> Vec<u8>;
    /// The same, encoded later on another thread: what is captured now must not change with
    /// later entries. The default encodes now.
    fn snapshot_later(&self) -> Box<dyn FnOnce() -> Vec<u8> + Send> {
        let data = self.snapshot();
        Box::new(move || data)
    }
    /// Replace the state with a snapshot's. Empty data is the initial (empty) state: the
    /// snapshot a new cluster starts from carries no data.
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
    /// A membership change was applied at this point of the log (to keep member addresses
    /// in the snapshot, for instance).
    fn conf_changed(&mut self, _change: &AppliedConfChange) {}
}

/// Why a proposal or read did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known right now (an election is running); retry shortly.
    #[error("no leader is known; retry")]
    NoLeader,
    /// A leader-only proposal ([`RaftNode::propose_as_leader`]) on a server that is not the
    /// leader.
    #[error("this server is not the leader")]
    NotLeader,
    /// The entry did not apply in time. It may still apply later: the outcome is unknown.
    #[error("timed out before the entry was applied; the outcome is unknown")]
    Timeout,
    /// The leader changed (or was lost) before the entry applied here: a proposal forwarded to
    /// a leader that died is lost, one it had replicated may still apply. The outcome is
    /// unknown; retry where repeating is safe (an idempotency key), at once.
    #[error("the leader changed before the entry was applied; the outcome is unknown")]
    LeaderChanged,
    /// The request is not valid in the current membership.
    #[error("{0}")]
    Invalid(String),
    /// The local store failed; this server is stopping.
    #[error("storage failed: {0}")]
    Storage(String),
}

/// Receives the result of a proposal: the state machine's answer, or why there is none.
pub type Responder<O> = Box<dyn FnOnce(Result<O, ProposeError>) + Send>;

/// Runs against the state machine once a linearizable read point is applied.
pub type ReadFn<M> = Box<dyn FnOnce(Result<&M, ProposeError>) + Send>;

/// Driver settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This server's Raft id (non-zero).
    pub id: u64,
    /// Ticks without a leader before an election (randomised up to twice this).
    pub election_tick: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_tick: usize,
    /// Take a snapshot and compact the log every this many applied entries.
    pub snapshot_every: u64,
    /// Largest append message in bytes.
    pub max_size_per_msg: u64,
    /// Most append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Ticks a proposal or read may wait before it fails with [`ProposeError::Timeout`].
    pub request_timeout_ticks: u64,
    /// First proposal id; give each start of a server a different one (the server uses the
    /// time it started, in nanoseconds).
    pub id_seed: u64,
}

impl NodeConfig {
    /// Defaults: elections after 10 to 20 ticks without a leader, heartbeats every 2 ticks,
    /// requests time out after 200 ticks (10 s at a 50 ms tick).
    pub fn new(id: u64) -> NodeConfig {
        NodeConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_every: 10_000,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            request_timeout_ticks: 200,
            id_seed: 1,
        }
    }
}

/// A membership change that was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedConfChange {
    /// Added as learner, added as voter, or removed.
    pub change: ConfChangeType,
    /// The server concerned.
    pub node: u64,
    /// What the proposer attached (Tessera: the server's address).
    pub context: Vec<u8>,
}

/// A snapshot to encode and write on another thread, from [`RaftNode::take_snapshot_job`].
pub struct SnapshotJob {
    index: u64,
    term: u64,
    conf: ConfState,
    build: Box<dyn FnOnce() -> Vec<u8> + Send>,
    write: crate::storage::SnapshotWriter,
}

impl SnapshotJob {
    /// The log index it is taken at.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Encode the state and write it durably; the snapshot, or None if the store already held
    /// one as new. Takes long for a large state: run it off the Raft thread.
    pub fn run(self) -> Result<Option<Snapshot>, StoreError> {
        let started = std::time::Instant::now();
        let data = (self.build)();
        let (bytes, encoded) = (data.len(), started.elapsed());
        let snap = crate::storage::mem::new_snapshot(data, self.index, self.term, &self.conf);
        let written = (self.write)(&snap)?;
        tracing::info!(
            index = self.index,
            bytes,
            encode_ms = encoded.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "snapshot encoded and written"
        );
        Ok(written.then_some(snap))
    }
}

/// What one `Ready` cycle produced for the caller.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send to other servers, by `Message::to`.
    pub messages: Vec<Message>,
    /// Membership changes applied in this cycle.
    pub conf_changes: Vec<AppliedConfChange>,
    /// The role, when it changed.
    pub role: Option<StateRole>,
    /// Entries applied in this cycle.
    pub applied: u64,
    /// A snapshot from the leader replaced the state machine in this cycle (state kept only
    /// in the state machine, such as member addresses, may have changed).
    pub installed_snapshot: bool,
}

/// A point-in-time view of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This server.
    pub id: u64,
    /// Its role.
    pub role: StateRole,
    /// Current term.
    pub term: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// First index still in the log (after compaction).
    pub first_index: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Proposals and reads waiting to apply on this server.
    pub waiting: usize,
}

struct Pending<T> {
    respond: T,
    since: u64,
}

/// A Raft server: raft-rs's `RawNode` over a durable store, and the state machine it drives.
pub struct RaftNode<S: LogStore, M: StateMachine> {
    raw: RawNode<S>,
    sm: M,
    cfg: NodeConfig,
    applied: u64,
    last_snapshot: u64,
    snapshot_due: bool,
    /// A snapshot for the caller to write on another thread, and whether one is being written.
    snapshot_job: Option<SnapshotJob>,
    snapshot_in_flight: bool,
    ticks: u64,
    next_id: u64,
    proposals: BTreeMap<u64, Pending<Responder<M::Output>>>,
    reads: BTreeMap<u64, Pending<ReadFn<M>>>,
    ready_reads: VecDeque<(u64, ReadFn<M>)>,
    role: StateRole,
    /// The leader as of the last Ready cycle (0: none known).
    leader: u64,
}

fn context(node: u64, id: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.extend_from_slice(&node.to_be_bytes());
    c.extend_from_slice(&id.to_be_bytes());
    c
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let node = u64::from_be_bytes(c.get(..8)?.try_into().ok()?);
    let id = u64::from_be_bytes(c.get(8..16)?.try_into().ok()?);
    Some((node, id))
}

fn storage_err(e: StoreError) -> raft::Error {
    raft::Error::Store(raft::StorageError::Other(Box::new(e)))
}

impl<S: LogStore, M: StateMachine> RaftNode<S, M> {
    /// Start a server over `store` (empty for a new server, or what a previous run left). The
    /// state machine is restored from the store's latest snapshot; the entries after it are
    /// applied again as they come out of the log.
    pub fn new(cfg: NodeConfig, store: S, mut sm: M, logger: &slog::Logger) -> Result<Self, raft::Error> {
        let mut applied = 0;
        if let Some(snap) = store.latest_snapshot() {
            sm.restore(snap.get_data())
                .map_err(|e| storage_err(StoreError::Corrupt { what: "snapshot".into(), detail: e }))?;
            applied = snap.get_metadata().index;
        }
        let rc = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        rc.validate()?;
        let id_seed = cfg.id_seed;
        let raw = RawNode::new(&rc, store, logger)?;
        Ok(RaftNode {
            raw,
            sm,
            cfg,
            applied,
            last_snapshot: applied,
            snapshot_due: false,
            snapshot_job: None,
            snapshot_in_flight: false,
            ticks: 0,
            // Proposal ids must not repeat across restarts: an entry proposed before a crash
            // may still apply after it, and must not answer a new caller.
            next_id: id_seed,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            ready_reads: VecDeque::new(),
            role: StateRole::Follower,
            leader: 0,
        })
    }

    /// The state machine, as of the last applied entry (a stale read on followers).
    pub fn state_machine(&self) -> &M {
        &self.sm
    }

    /// The store.
    pub fn store(&self) -> &S {
        self.raw.store()
    }

    /// Advance the logical clock by one tick; fails requests that waited too long.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        let limit = self.cfg.request_timeout_ticks;
        let now = self.ticks;
        let expired: Vec<u64> = self.proposals.iter().filter(|(_, p)| now - p.since > limit).map(|(k, _)| *k).collect();
        for id in expired {
            if let Some(p) = self.proposals.remove(&id) {
                (p.respond)(Err(ProposeError::Timeout));
            }
        }
        let expired: Vec<u64> = self.reads.iter().filter(|(_, p)| now - p.since > limit).map(|(k, _)| *k).collect();
        for id in expired {
            if let Some(p) = self.reads.remove(&id) {
                (p.respond)(Err(ProposeError::Timeout));
            }
        }
    }

    /// Deliver a message from another server.
    pub fn step(&mut self, msg: Message) -> Result<(), raft::Error> {
        self.raw.step(msg)
    }

    /// Propose an entry. Followers forward it to the leader; `respond` gets the state
    /// machine's answer once the entry is applied here.
    pub fn propose(&mut self, data: Vec<u8>, respond: Responder<M::Output>) {
        let id = self.next_id;
        self.next_id += 1;
        match self.raw.propose(context(self.cfg.id, id), data) {
            Ok(()) => {
                self.proposals.insert(id, Pending { respond, since: self.ticks });
            }
            Err(raft::Error::ProposalDropped) => respond(Err(ProposeError::NoLeader)),
            Err(e) => respond(Err(ProposeError::Invalid(e.to_string()))),
        }
    }

    /// Propose an entry only if this server is the leader now; otherwise fail at once with
    /// [`ProposeError::NotLeader`] instead of forwarding it. For judgements only a leader may
    /// make from what it alone has seen (an agent's silence): a deposed leader, resuming from a
    /// freeze before it has heard of its successor, must not have its stale verdicts committed
    /// by the new leader. A proposal it makes while it still believes it leads stays in its
    /// own log under its old term, which the new leader overwrites.
    pub fn propose_as_leader(&mut self, data: Vec<u8>, respond: Responder<M::Output>) {
        if self.raw.raft.state != StateRole::Leader {
            return respond(Err(ProposeError::NotLeader));
        }
        self.propose(data, respond);
    }

    /// Propose a membership change; followers forward it to the leader. `address` travels with
    /// it so every server learns where the new member listens. One change at a time: the leader
    /// drops a second one while the first is not applied (the proposer then times out).
    pub fn propose_conf_change(
        &mut self,
        change: ConfChangeType,
        node: u64,
        address: Vec<u8>,
        respond: Responder<M::Output>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let mut cc = ConfChange::default();
        cc.set_change_type(change);
        cc.node_id = node;
        cc.context = address.into();
        match self.raw.propose_conf_change(context(self.cfg.id, id), cc) {
            Ok(()) => {
                self.proposals.insert(id, Pending { respond, since: self.ticks });
            }
            Err(raft::Error::ProposalDropped) => respond(Err(ProposeError::NoLeader)),
            Err(e) => respond(Err(ProposeError::Invalid(e.to_string()))),
        }
    }

    /// Highest log index known to be replicated on `peer` (leader only).
    pub fn matched(&self, peer: u64) -> Option<u64> {
        self.raw.raft.prs().get(peer).map(|p| p.matched)
    }

    /// A linearizable read: `f` runs against the state machine once everything committed
    /// before this call is applied here (ReadIndex).
    pub fn read(&mut self, f: ReadFn<M>) {
        let id = self.next_id;
        self.next_id += 1;
        self.raw.read_index(context(self.cfg.id, id));
        self.reads.insert(id, Pending { respond: f, since: self.ticks });
    }

    /// Hand leadership to `to` (used before removing the leader).
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// Start an election now.
    pub fn campaign(&mut self) -> Result<(), raft::Error> {
        self.raw.campaign()
    }

    /// A peer could not be reached: raft-rs stops pipelining to it.
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    /// The outcome of sending a snapshot to a peer.
    pub fn report_snapshot(&mut self, to: u64, ok: bool) {
        let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(to, status);
    }

    /// Where the node stands.
    pub fn status(&self) -> Status {
        let r = &self.raw.raft;
        let conf = r.prs().conf().to_conf_state();
        let mut voters = conf.voters.clone();
        voters.sort_unstable();
        let mut learners = conf.learners.clone();
        learners.sort_unstable();
        Status {
            id: self.cfg.id,
            role: r.state,
            term: r.term,
            leader: r.leader_id,
            commit: r.raft_log.committed,
            applied: self.applied,
            first_index: r.raft_log.first_index(),
            last_index: r.raft_log.last_index(),
            voters,
            learners,
            waiting: self.proposals.len() + self.reads.len() + self.ready_reads.len(),
        }
    }

    /// Is there work for [`RaftNode::process_ready`]?
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready() || self.ready_reads.front().is_some_and(|(index, _)| *index <= self.applied)
    }

    /// Run one Ready cycle: persist entries, hard state and snapshots with ONE flush, then hand
    /// back the messages to send and apply what is committed. A storage error is fatal.
    pub fn process_ready(&mut self) -> Result<Output, StoreError> {
        let mut out = Output::default();
        if !self.raw.has_ready() {
            self.run_reads();
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            if ss.raft_state != self.role {
                self.role = ss.raft_state;
                out.role = Some(ss.raft_state);
            }
            if ss.leader_id != self.leader {
                self.leader = ss.leader_id;
                self.fail_waiting(ProposeError::LeaderChanged);
            }
        }
        // A leader may send before it persists (raft thesis 10.2.1); followers send after.
        out.messages.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(&snap)?;
            out.installed_snapshot = true;
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, &mut out)?;
        let mut wrote = false;
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries())?;
            wrote = true;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs)?;
            wrote = true;
        }
        if wrote || !rd.snapshot().is_empty() {
            // Group commit: one fsync for everything this Ready carried.
            self.raw.mut_store().flush()?;
        }
        out.messages.extend(rd.take_persisted_messages());
        for rs in rd.take_read_states() {
            if let Some((node, id)) = parse_context(&rs.request_ctx)
                && node == self.cfg.id
                && let Some(p) = self.reads.remove(&id)
            {
                self.ready_reads.push_back((rs.index, p.respond));
            }
        }
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.raft.hard_state();
            hs.commit = commit;
            self.raw.mut_store().set_hard_state(&hs)?;
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed, &mut out)?;
        self.raw.advance_apply_to(self.applied);
        self.run_reads();
        self.maybe_snapshot()?;
        Ok(out)
    }

    /// A snapshot to write on another thread ([`SnapshotJob::run`]), when one is due; hand
    /// the outcome to [`RaftNode::snapshot_written`]. Only one is out at a time.
    pub fn take_snapshot_job(&mut self) -> Option<SnapshotJob> {
        self.snapshot_job.take()
    }

    /// The outcome of a [`SnapshotJob`]: the snapshot becomes the latest and the log is
    /// compacted up to it. A storage error is fatal, as in [`RaftNode::process_ready`].
    pub fn snapshot_written(&mut self, written: Result<Option<Snapshot>, StoreError>) -> Result<(), StoreError> {
        self.snapshot_in_flight = false;
        if let Some(snap) = written? {
            let index = snap.get_metadata().index;
            if self.raw.mut_store().adopt_snapshot(snap)? {
                tracing::info!(index, "snapshot written in the background, log compacted");
            }
        }
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        let index = snap.get_metadata().index;
        self.sm
            .restore(snap.get_data())
            .map_err(|e| StoreError::Corrupt { what: format!("snapshot at {index}"), detail: e })?;
        self.raw.mut_store().apply_snapshot(snap)?;
        self.applied = index;
        self.last_snapshot = index;
        tracing::info!(index, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), StoreError> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            let mut result = M::Output::default();
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {}
                EntryType::EntryNormal => result = self.sm.apply(e.index, &e.data),
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    match cc.merge_from_bytes(&e.data) {
                        Ok(()) => match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => {
                                self.raw.mut_store().set_conf_state(&cs)?;
                                let applied = AppliedConfChange {
                                    change: cc.get_change_type(),
                                    node: cc.node_id,
                                    context: cc.context.to_vec(),
                                };
                                self.sm.conf_changed(&applied);
                                out.conf_changes.push(applied);
                                // A server that joins catches up through a snapshot, and raft-rs
                                // refuses one whose membership does not include it: keep the
                                // stored snapshot's membership current.
                                self.snapshot_due = true;
                            }
                            Err(err) => tracing::warn!(index = e.index, %err, "membership change refused"),
                        },
                        Err(err) => tracing::error!(index = e.index, %err, "undecodable membership change skipped"),
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::error!(index = e.index, "joint membership changes are not used by Tessera; entry skipped")
                }
            }
            self.applied = e.index;
            out.applied += 1;
            if let Some((node, id)) = parse_context(&e.context)
                && node == self.cfg.id
                && let Some(p) = self.proposals.remove(&id)
            {
                (p.respond)(Ok(result));
            }
        }
        Ok(())
    }

    /// Fail every proposal and read waiting here: they went to a leader that is gone (or
    /// this server was the leader), so nothing will answer them until they time out. Entries
    /// already in this server's log still apply; their callers retry with the same key.
    fn fail_waiting(&mut self, why: ProposeError) {
        let n = self.proposals.len() + self.reads.len();
        for (_, p) in std::mem::take(&mut self.proposals) {
            (p.respond)(Err(why.clone()));
        }
        for (_, p) in std::mem::take(&mut self.reads) {
            (p.respond)(Err(why.clone()));
        }
        if n > 0 {
            tracing::info!(failed = n, leader = self.leader, "leader changed; waiting proposals and reads failed");
        }
    }

    fn run_reads(&mut self) {
        while let Some((index, _)) = self.ready_reads.front() {
            if *index > self.applied {
                break;
            }
            if let Some((_, f)) = self.ready_reads.pop_front() {
                f(Ok(&self.sm));
            }
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        if !self.snapshot_due && self.applied < self.last_snapshot + self.cfg.snapshot_every {
            return Ok(());
        }
        // A periodic snapshot of a store that can write in the background is handed to the
        // caller (a membership change's snapshot is taken here and now: a joining server
        // needs it current).
        if !self.snapshot_due {
            if self.snapshot_in_flight {
                return Ok(());
            }
            if let Some(write) = self.raw.store().snapshot_writer() {
                let term = self.raw.store().term(self.applied).map_err(|e| StoreError::Engine(e.to_string()))?;
                let conf: ConfState = self.raw.raft.prs().conf().to_conf_state();
                self.snapshot_job =
                    Some(SnapshotJob { index: self.applied, term, conf, build: self.sm.snapshot_later(), write });
                self.snapshot_in_flight = true;
                self.last_snapshot = self.applied;
                return Ok(());
            }
        }
        self.snapshot_due = false;
        let started = std::time::Instant::now();
        let data = self.sm.snapshot();
        let (bytes, serialised) = (data.len(), started.elapsed());
        let conf: ConfState = self.raw.raft.prs().conf().to_conf_state();
        self.raw.mut_store().save_snapshot(data, self.applied, &conf)?;
        self.last_snapshot = self.applied;
        tracing::info!(
            index = self.applied,
            bytes,
            serialise_ms = serialised.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "snapshot taken, log compacted"
        );
        Ok(())
    }
}
