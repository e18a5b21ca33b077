//! An in-memory multi-server harness (after raft-rs's `harness/src/network.rs`): several
//! [`RaftNode`]s in one thread over a network that can cut links, drop and reorder messages,
//! crash and restart servers. No sockets, no clock: every run is reproducible from its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use raft::StateRole;
use raft::eraftpb::{ConfChangeType, Message};

use crate::logging::tracing_logger;
use crate::node::{NodeConfig, ProposeError, RaftNode, StateMachine};
use crate::storage::bootstrap_cluster;
use crate::storage::mem::MemStore;

/// A state machine that records what it applied.
#[derive(Default, Clone, PartialEq, Eq, Debug)]
struct Log {
    entries: Vec<Vec<u8>>,
}

impl StateMachine for Log {
    type Output = Vec<u8>;
    fn apply(&mut self, _index: u64, data: &[u8]) -> Vec<u8> {
        self.entries.push(data.to_vec());
        (self.entries.len() as u64).to_be_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.entries {
            out.extend_from_slice(&(e.len() as u32).to_be_bytes());
            out.extend_from_slice(e);
        }
        out
    }
    fn restore(&mut self, mut data: &[u8]) -> Result<(), String> {
        self.entries.clear();
        while !data.is_empty() {
            let len = u32::from_be_bytes(data.get(..4).ok_or("short")?.try_into().map_err(|_| "short")?) as usize;
            self.entries.push(data.get(4..4 + len).ok_or("short")?.to_vec());
            data = &data[4 + len..];
        }
        Ok(())
    }
}

type Node = RaftNode<MemStore, Log>;
type Outcome = Arc<Mutex<Option<Result<Vec<u8>, ProposeError>>>>;

struct Net {
    nodes: BTreeMap<u64, Node>,
    crashed: BTreeMap<u64, MemStore>,
    cut: BTreeSet<(u64, u64)>,
    drop_percent: u64,
    reorder: bool,
    rng: u64,
    snapshot_every: u64,
}

fn cfg(id: u64, snapshot_every: u64) -> NodeConfig {
    NodeConfig { snapshot_every, ..NodeConfig::new(id) }
}

impl Net {
    fn new(n: u64, snapshot_every: u64) -> Net {
        let voters: Vec<u64> = (1..=n).collect();
        let logger = tracing_logger();
        let nodes = voters
            .iter()
            .map(|id| {
                let mut store = MemStore::default();
                bootstrap_cluster(&mut store, &voters).unwrap();
                (*id, RaftNode::new(cfg(*id, snapshot_every), store, Log::default(), &logger).unwrap())
            })
            .collect();
        Net {
            nodes,
            crashed: BTreeMap::new(),
            cut: BTreeSet::new(),
            drop_percent: 0,
            reorder: false,
            rng: 0x9e37_79b9_7f4a_7c15,
            snapshot_every,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: reproducible, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Process every Ready and deliver messages until the network is quiet.
    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut msgs: Vec<Message> = Vec::new();
            for node in self.nodes.values_mut() {
                while node.has_ready() {
                    let out = node.process_ready().unwrap();
                    msgs.extend(out.messages);
                }
            }
            if msgs.is_empty() {
                return;
            }
            if self.reorder {
                for i in (1..msgs.len()).rev() {
                    let j = (self.rand() % (i as u64 + 1)) as usize;
                    msgs.swap(i, j);
                }
            }
            for m in msgs {
                let (from, to) = (m.from, m.to);
                let snapshot = m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
                let lost = self.cut.contains(&(from, to))
                    || (self.drop_percent > 0 && self.rand() % 100 < self.drop_percent)
                    || !self.nodes.contains_key(&to);
                if !lost {
                    let _ = self.nodes.get_mut(&to).map(|n| n.step(m));
                }
                // Like the real transport: tell the sender whether its snapshot arrived.
                if snapshot && let Some(sender) = self.nodes.get_mut(&from) {
                    sender.report_snapshot(to, !lost);
                }
            }
        }
    }

    fn run(&mut self, ticks: usize) {
        for _ in 0..ticks {
            for node in self.nodes.values_mut() {
                node.tick();
            }
            self.pump();
        }
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .values()
            .map(|n| n.status())
            .filter(|s| s.role == StateRole::Leader)
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    fn elect(&mut self) -> u64 {
        for _ in 0..100 {
            self.run(5);
            if let Some(l) = self.leader() {
                return l;
            }
        }
        panic!("no leader elected");
    }

    fn propose(&mut self, on: u64, data: &[u8]) -> Outcome {
        let outcome: Outcome = Arc::new(Mutex::new(None));
        let o = outcome.clone();
        self.nodes.get_mut(&on).unwrap().propose(data.to_vec(), Box::new(move |r| *o.lock().unwrap() = Some(r)));
        outcome
    }

    fn conf_change(&mut self, on: u64, change: ConfChangeType, node: u64) -> Outcome {
        let outcome: Outcome = Arc::new(Mutex::new(None));
        let o = outcome.clone();
        self.nodes.get_mut(&on).unwrap().propose_conf_change(
            change,
            node,
            format!("127.0.0.1:{}", 7000 + node).into_bytes(),
            Box::new(move |r| *o.lock().unwrap() = Some(r)),
        );
        outcome
    }

    fn isolate(&mut self, id: u64) {
        let all: Vec<u64> = self.nodes.keys().copied().chain(self.crashed.keys().copied()).collect();
        for other in all {
            self.cut.insert((id, other));
            self.cut.insert((other, id));
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.drop_percent = 0;
        self.reorder = false;
    }

    fn crash(&mut self, id: u64) {
        // What survives a crash is what the store holds (MemStore clones deeply).
        let node = self.nodes.remove(&id).unwrap();
        self.crashed.insert(id, node.store().clone());
    }

    fn restart(&mut self, id: u64) {
        let store = self.crashed.remove(&id).unwrap();
        let node = RaftNode::new(cfg(id, self.snapshot_every), store, Log::default(), &tracing_logger()).unwrap();
        self.nodes.insert(id, node);
    }

    fn logs(&self) -> BTreeMap<u64, Vec<Vec<u8>>> {
        self.nodes.iter().map(|(id, n)| (*id, n.state_machine().entries.clone())).collect()
    }

    fn assert_converged(&self) {
        let logs = self.logs();
        let first = logs.values().next().unwrap();
        for (id, log) in &logs {
            assert_eq!(log, first, "server {id} applied a different log");
        }
    }
}

fn done(o: &Outcome) -> Option<Result<Vec<u8>, ProposeError>> {
    o.lock().unwrap().clone()
}

#[test]
fn elects_a_leader_and_replicates_proposals_from_any_server() {
    let mut net = Net::new(3, 1000);
    let leader = net.elect();
    let follower = *net.nodes.keys().find(|id| **id != leader).unwrap();
    let mut outcomes = Vec::new();
    for i in 0..30u8 {
        let on = if i % 2 == 0 { leader } else { follower };
        outcomes.push(net.propose(on, &[i]));
    }
    net.run(3);
    for (i, o) in outcomes.iter().enumerate() {
        assert!(matches!(done(o), Some(Ok(_))), "proposal {i}: {:?}", done(o));
    }
    net.assert_converged();
    assert_eq!(net.logs()[&leader].len(), 30);
    let s = net.nodes[&leader].status();
    assert_eq!(s.commit, s.applied);
    assert_eq!(s.voters, vec![1, 2, 3]);
}

#[test]
fn a_partitioned_leader_commits_nothing_and_the_cluster_converges() {
    let mut net = Net::new(3, 1000);
    let old = net.elect();
    net.propose(old, b"before");
    net.run(2);
    net.isolate(old);
    let lost = net.propose(old, b"lost");
    net.run(40);
    let new = net.leader().filter(|l| *l != old).expect("the majority elects a new leader");
    let kept = net.propose(new, b"after");
    net.run(5);
    assert!(matches!(done(&kept), Some(Ok(_))));
    net.heal();
    net.run(150);
    net.assert_converged();
    let log = &net.logs()[&old];
    assert!(log.contains(&b"after".to_vec()));
    assert!(!log.contains(&b"lost".to_vec()), "an entry of the cut-off leader was applied");
    assert!(!matches!(done(&lost), Some(Ok(_))), "the cut-off proposal reported success");
}

/// A proposal forwarded to a leader that died is lost. Its caller hears so once the follower
/// knows the leader is gone, not after the request timeout (200 ticks), and a retry on the
/// new leader commits.
#[test]
fn a_proposal_forwarded_to_a_dead_leader_fails_when_the_leader_changes() {
    let mut net = Net::new(3, 1000);
    let old = net.elect();
    let follower = *net.nodes.keys().find(|id| **id != old).unwrap();
    net.isolate(old);
    let lost = net.propose(follower, b"lost");
    let read: Arc<Mutex<Option<Result<(), ProposeError>>>> = Arc::new(Mutex::new(None));
    let r = read.clone();
    net.nodes.get_mut(&follower).unwrap().read(Box::new(move |sm| *r.lock().unwrap() = Some(sm.map(|_| ()))));
    let mut ticks = 0;
    while done(&lost).is_none() && ticks < 150 {
        net.run(1);
        ticks += 1;
    }
    assert_eq!(done(&lost), Some(Err(ProposeError::LeaderChanged)), "after {ticks} ticks");
    assert!(ticks <= 60, "the lost proposal waited {ticks} ticks (election timeout is 10-20)");
    assert_eq!(*read.lock().unwrap(), Some(Err(ProposeError::LeaderChanged)));
    // The isolated old leader may still call itself leader until the others elect one (of a
    // higher term, which `leader()` prefers): wait for that one.
    let mut rounds = 0;
    let new = loop {
        let l = net.elect();
        if l != old || rounds == 100 {
            break l;
        }
        rounds += 1;
    };
    assert_ne!(new, old, "no new leader among the connected servers");
    let again = net.propose(follower, b"lost");
    net.run(3);
    assert!(matches!(done(&again), Some(Ok(_))), "the retry: {:?}", done(&again));
    net.heal();
    net.run(100);
    net.assert_converged();
    assert_eq!(net.logs()[&old].iter().filter(|e| e.as_slice() == b"lost").count(), 1);
}

#[test]
fn dropped_and_reordered_messages_still_agree() {
    let mut net = Net::new(5, 50);
    net.elect();
    net.drop_percent = 20;
    net.reorder = true;
    let mut ok = 0;
    for i in 0..200u32 {
        if let Some(l) = net.leader() {
            let o = net.propose(l, &i.to_be_bytes());
            net.run(1);
            if matches!(done(&o), Some(Ok(_))) {
                ok += 1;
            }
        } else {
            net.run(3);
        }
    }
    net.heal();
    net.run(100);
    net.assert_converged();
    let applied = net.logs().values().next().unwrap().len();
    assert!(ok > 0 && applied >= ok, "{ok} acknowledged, {applied} applied");
}

#[test]
fn a_lagging_follower_catches_up_from_a_snapshot() {
    let mut net = Net::new(3, 20);
    let leader = net.elect();
    let lagger = *net.nodes.keys().find(|id| **id != leader).unwrap();
    net.isolate(lagger);
    for i in 0..100u32 {
        net.propose(leader, &i.to_be_bytes());
        net.run(1);
    }
    assert!(net.nodes[&leader].status().first_index > 50, "the leader compacted its log");
    net.heal();
    net.run(50);
    net.assert_converged();
    assert_eq!(net.logs()[&lagger].len(), 100);
    use crate::storage::LogStore;
    assert!(net.nodes[&lagger].store().latest_snapshot().is_some(), "it caught up through a snapshot");
}

#[test]
fn crashed_servers_restart_from_their_store() {
    let mut net = Net::new(3, 10);
    let leader = net.elect();
    for i in 0..25u8 {
        net.propose(leader, &[i]);
    }
    net.run(3);
    let follower = *net.nodes.keys().find(|id| **id != leader).unwrap();
    net.crash(follower);
    for i in 25..40u8 {
        net.propose(leader, &[i]);
    }
    net.run(3);
    net.restart(follower);
    net.run(20);
    net.assert_converged();
    assert_eq!(net.logs()[&follower].len(), 40);
    // The whole cluster stops and starts.
    let ids: Vec<u64> = net.nodes.keys().copied().collect();
    for id in &ids {
        net.crash(*id);
    }
    for id in &ids {
        net.restart(*id);
    }
    net.elect();
    net.run(10);
    net.assert_converged();
    assert_eq!(net.logs()[&follower].len(), 40);
}

#[test]
fn linearizable_reads_see_every_acknowledged_write() {
    let mut net = Net::new(3, 1000);
    let leader = net.elect();
    let follower = *net.nodes.keys().find(|id| **id != leader).unwrap();
    let w = net.propose(leader, b"x");
    net.run(2);
    assert!(matches!(done(&w), Some(Ok(_))));
    let seen: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
    let s = seen.clone();
    net.nodes.get_mut(&follower).unwrap().read(Box::new(move |sm| {
        *s.lock().unwrap() = sm.ok().map(|m| m.entries.len());
    }));
    net.run(2);
    assert_eq!(*seen.lock().unwrap(), Some(1));
}

#[test]
fn membership_add_a_learner_promote_it_and_remove_the_leader() {
    let mut net = Net::new(3, 1000);
    let leader = net.elect();
    for i in 0..10u8 {
        net.propose(leader, &[i]);
    }
    net.run(2);
    // Server 4 starts empty and joins as a learner first.
    let node = RaftNode::new(cfg(4, 1000), MemStore::default(), Log::default(), &tracing_logger()).unwrap();
    net.nodes.insert(4, node);
    let o = net.conf_change(leader, ConfChangeType::AddLearnerNode, 4);
    net.run(10);
    assert!(matches!(done(&o), Some(Ok(_))), "{:?}", done(&o));
    assert_eq!(net.nodes[&leader].status().learners, vec![4]);
    assert_eq!(net.logs()[&4].len(), 10, "the learner caught up");
    let o = net.conf_change(leader, ConfChangeType::AddNode, 4);
    net.run(10);
    assert!(matches!(done(&o), Some(Ok(_))));
    assert_eq!(net.nodes[&leader].status().voters, vec![1, 2, 3, 4]);
    // Removing the leader: hand leadership over first (any server may ask), then a follower
    // proposes the removal and raft forwards it to the new leader.
    let follower = *net.nodes.keys().find(|id| **id != leader && **id != 4).unwrap();
    for _ in 0..10 {
        net.nodes.get_mut(&follower).unwrap().transfer_leader(4);
        net.run(20);
        if net.leader() == Some(4) {
            break;
        }
    }
    assert_eq!(net.leader(), Some(4));
    let o = net.conf_change(follower, ConfChangeType::RemoveNode, leader);
    net.run(10);
    assert!(matches!(done(&o), Some(Ok(_))));
    net.nodes.remove(&leader);
    let w = net.propose(4, b"after removal");
    net.run(5);
    assert!(matches!(done(&w), Some(Ok(_))));
    assert_eq!(net.nodes[&4].status().voters.len(), 3, "{:?} removed {leader}", net.nodes[&4].status());
    net.assert_converged();
}

#[test]
fn a_leader_only_proposal_fails_on_a_follower_and_applies_on_the_leader() {
    let mut net = Net::new(3, 1000);
    let leader = net.elect();
    let follower = *net.nodes.keys().find(|id| **id != leader).unwrap();
    let on_follower: Outcome = Arc::new(Mutex::new(None));
    let o = on_follower.clone();
    net.nodes
        .get_mut(&follower)
        .unwrap()
        .propose_as_leader(b"verdict".to_vec(), Box::new(move |r| *o.lock().unwrap() = Some(r)));
    // At once, and nothing was forwarded: it never applies anywhere.
    assert_eq!(done(&on_follower), Some(Err(ProposeError::NotLeader)));
    let on_leader: Outcome = Arc::new(Mutex::new(None));
    let o = on_leader.clone();
    net.nodes
        .get_mut(&leader)
        .unwrap()
        .propose_as_leader(b"verdict".to_vec(), Box::new(move |r| *o.lock().unwrap() = Some(r)));
    net.run(3);
    assert!(matches!(done(&on_leader), Some(Ok(_))), "{:?}", done(&on_leader));
}
