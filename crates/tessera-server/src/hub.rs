//! The leader's in-memory view of its agents: each node's session generation, when it was last
//! heard from, where its agent listens, and the route to its session's outbox. Liveness never
//! enters the log; `agents` turns overdue nodes into node-down proposals.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tessera_core::Timestamp;
use tessera_core::model::{AttemptId, NodeId};
use tessera_proto::v1;
use tokio::sync::{mpsc, oneshot};

/// Timing of the agent protocol.
#[derive(Debug, Clone, Copy)]
pub struct AgentTimeouts {
    /// How often agents send a heartbeat.
    pub heartbeat: Duration,
    /// How long an agent keeps shards running without an acknowledged message.
    pub fence: Duration,
    /// How long the leader waits without hearing from a node before it proposes it down
    /// (longer than `fence`).
    pub node_down: Duration,
    /// How long a node whose stream closed has to reconnect before it is proposed down.
    pub reconnect_grace: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> Self {
        AgentTimeouts {
            heartbeat: Duration::from_secs(1),
            fence: Duration::from_secs(3),
            node_down: Duration::from_secs(4),
            reconnect_grace: Duration::from_secs(1),
        }
    }
}

pub(crate) struct Session {
    generation: u64,
    last_seen: Instant,
    closed_at: Option<Instant>,
}

/// The leader's view of its agents.
pub struct AgentHub {
    pub(crate) timeouts: AgentTimeouts,
    pub(crate) sessions: Mutex<BTreeMap<NodeId, Session>>,
    /// Where each node's agent can be reached (MASTER_ADDR of the jobs it leads).
    addresses: Mutex<BTreeMap<NodeId, String>>,
    generation: std::sync::atomic::AtomicU64,
    pub(crate) leader_since: Mutex<Option<Instant>>,
    /// Where the router delivers each connected node's messages (see [`route_loop`]).
    routes: Mutex<HashMap<NodeId, Route>>,
    /// Reads of agents' disks in flight (`JobLogs`), by request id: who was asked, for what, and
    /// who waits.
    log_reads: Mutex<HashMap<u64, LogReadWait>>,
    next_read: std::sync::atomic::AtomicU64,
}

/// Messages for one agent, each assignment keyed by its attempt (so a session sends it once).
pub(crate) type Routed = Vec<(Option<AttemptId>, v1::ServerMessage)>;

/// A read of an agent's disk waiting for its answer.
struct LogReadWait {
    node: NodeId,
    attempt_id: u64,
    stream: i32,
    tx: oneshot::Sender<v1::LogRead>,
}

struct Route {
    generation: u64,
    tx: mpsc::UnboundedSender<Routed>,
}

impl AgentHub {
    /// A hub with these timeouts.
    pub fn new(timeouts: AgentTimeouts) -> AgentHub {
        AgentHub {
            timeouts,
            sessions: Mutex::new(BTreeMap::new()),
            addresses: Mutex::new(BTreeMap::new()),
            generation: std::sync::atomic::AtomicU64::new(1),
            leader_since: Mutex::new(None),
            routes: Mutex::new(HashMap::new()),
            log_reads: Mutex::new(HashMap::new()),
            next_read: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Ask `node`'s agent for part of an attempt's output from its disk and wait up to
    /// `timeout` for the answer; None if the node has no session here or it did not answer.
    pub(crate) async fn read_agent_log(
        &self,
        node: NodeId,
        mut req: v1::ReadLog,
        timeout: std::time::Duration,
    ) -> Option<v1::LogRead> {
        let id = self.next_read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        req.request_id = id;
        let (tx, rx) = oneshot::channel();
        let wait = LogReadWait { node, attempt_id: req.attempt_id, stream: req.stream, tx };
        self.log_reads.lock().ok()?.insert(id, wait);
        let msg = v1::ServerMessage { payload: Some(v1::server_message::Payload::ReadLog(req)) };
        let sent = self.routes.lock().ok().and_then(|r| r.get(&node).map(|r| r.tx.send(vec![(None, msg)]).is_ok()));
        let answer =
            if sent == Some(true) { tokio::time::timeout(timeout, rx).await.ok().and_then(Result::ok) } else { None };
        if let Ok(mut pending) = self.log_reads.lock() {
            pending.remove(&id);
        }
        answer
    }

    /// `node`'s agent answered a read of its disk. An answer nobody waits for, or that is not
    /// from the node asked or not about the attempt and stream asked for, is dropped.
    pub fn log_read(&self, node: NodeId, answer: v1::LogRead) {
        let Ok(mut pending) = self.log_reads.lock() else { return };
        let matches = pending
            .get(&answer.request_id)
            .is_some_and(|w| w.node == node && w.attempt_id == answer.attempt_id && w.stream == answer.stream);
        if !matches {
            return;
        }
        if let Some(w) = pending.remove(&answer.request_id) {
            let _ = w.tx.send(answer);
        }
    }

    pub(crate) fn add_route(&self, node: NodeId, generation: u64) -> mpsc::UnboundedReceiver<Routed> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut r) = self.routes.lock() {
            r.insert(node, Route { generation, tx });
        }
        rx
    }

    pub(crate) fn remove_route(&self, node: NodeId, generation: u64) {
        if let Ok(mut r) = self.routes.lock()
            && r.get(&node).is_some_and(|r| r.generation == generation)
        {
            r.remove(&node);
        }
    }

    pub(crate) fn routed_nodes(&self) -> HashSet<NodeId> {
        self.routes.lock().map(|r| r.keys().copied().collect()).unwrap_or_default()
    }

    /// Hand each node's messages to its session; a node whose session ended is dropped.
    pub(crate) fn deliver(&self, msgs: HashMap<NodeId, Routed>) {
        let Ok(mut routes) = self.routes.lock() else { return };
        for (node, m) in msgs {
            if let Some(r) = routes.get(&node)
                && r.tx.send(m).is_err()
            {
                routes.remove(&node);
            }
        }
    }

    /// End every session's event feed (this server is no longer the leader: they close, and
    /// the agents reconnect to the new one).
    pub(crate) fn drop_routes(&self) {
        if let Ok(mut r) = self.routes.lock() {
            r.clear();
        }
    }

    pub(crate) fn open(&self, node: NodeId, address: String) -> u64 {
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(node, Session { generation, last_seen: Instant::now(), closed_at: None });
        }
        if !address.is_empty()
            && let Ok(mut a) = self.addresses.lock()
        {
            a.insert(node, address);
        }
        generation
    }

    pub(crate) fn seen(&self, node: NodeId, generation: u64) {
        if let Ok(mut s) = self.sessions.lock()
            && let Some(sess) = s.get_mut(&node).filter(|s| s.generation == generation)
        {
            sess.last_seen = Instant::now();
        }
    }

    pub(crate) fn closed(&self, node: NodeId, generation: u64) {
        if let Ok(mut s) = self.sessions.lock()
            && let Some(sess) = s.get_mut(&node).filter(|s| s.generation == generation)
        {
            sess.closed_at = Some(Instant::now());
        }
    }

    pub(crate) fn current(&self, node: NodeId, generation: u64) -> bool {
        self.sessions.lock().map(|s| s.get(&node).is_some_and(|x| x.generation == generation)).unwrap_or(false)
    }

    pub(crate) fn address(&self, node: NodeId) -> Option<String> {
        self.addresses.lock().ok().and_then(|a| a.get(&node).cloned())
    }

    /// Forget the silence seen so far: every session counts as heard from now, and this leader's
    /// time in office starts now (nodes without a session get a full node-down timeout).
    pub(crate) fn forgive(&self) {
        let now = Instant::now();
        if let Ok(mut s) = self.sessions.lock() {
            for session in s.values_mut() {
                session.last_seen = now;
                if session.closed_at.is_some() {
                    session.closed_at = Some(now);
                }
            }
        }
        if let Ok(mut l) = self.leader_since.lock()
            && l.is_some()
        {
            *l = Some(now);
        }
    }

    /// Nodes to propose down now, given the nodes the state holds as not down (with when each
    /// first registered) and the time now.
    ///
    /// A node with no session here is judged only once both this leader's time in office and
    /// the node's age exceed the node-down timeout: a new node is in the state from the moment
    /// its registration applies, a moment before its session opens on this leader, and under
    /// load that moment lasted long enough for 286 of 10,000 registering agents to be proposed
    /// down as "did not connect".
    pub(crate) fn overdue(&self, up: &[(NodeId, Timestamp)], wall: Timestamp) -> Vec<(NodeId, String)> {
        let now = Instant::now();
        let since = self.leader_since.lock().ok().and_then(|l| *l).unwrap_or(now);
        let Ok(sessions) = self.sessions.lock() else { return Vec::new() };
        let t = self.timeouts;
        let node_down_ms = t.node_down.as_millis() as u64;
        let mut out = Vec::new();
        for (id, registered_at) in up {
            match sessions.get(id) {
                Some(s) if s.closed_at.is_some_and(|c| now.duration_since(c) >= t.reconnect_grace) => {
                    out.push((*id, "its agent's stream closed and did not come back".to_string()))
                }
                Some(s) if now.duration_since(s.last_seen) >= t.node_down => out.push((
                    *id,
                    format!("no word from its agent for {} ms", now.duration_since(s.last_seen).as_millis()),
                )),
                None if now.duration_since(since) >= t.node_down
                    && wall.0.saturating_sub(registered_at.0) >= node_down_ms =>
                {
                    out.push((*id, "its agent did not connect to the new leader".to_string()))
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_disk_read_takes_only_the_answer_of_the_node_asked_about_what_it_asked() {
        let hub = std::sync::Arc::new(AgentHub::new(AgentTimeouts::default()));
        let (node, other) = (NodeId(1), NodeId(2));
        let mut routed = hub.add_route(node, 1);
        let asking = hub.clone();
        let req = v1::ReadLog { attempt_id: 7, stream: 1, max_bytes: 10, ..Default::default() };
        let read = tokio::spawn(async move { asking.read_agent_log(node, req, Duration::from_secs(5)).await });
        let sent = routed.recv().await.expect("the request went to the node's session");
        let Some(v1::server_message::Payload::ReadLog(r)) = sent[0].1.payload.clone() else { panic!("{sent:?}") };
        let answer = |attempt_id, stream, data: &[u8]| v1::LogRead {
            request_id: r.request_id,
            attempt_id,
            stream,
            data: data.to_vec(),
            found: true,
            ..Default::default()
        };
        hub.log_read(other, answer(7, 1, b"from another node"));
        hub.log_read(node, answer(8, 1, b"about another attempt"));
        hub.log_read(node, answer(7, 2, b"about another stream"));
        hub.log_read(node, answer(7, 1, b"the answer"));
        let got = read.await.expect("task").expect("an answer");
        assert_eq!(got.data, b"the answer");
        // No session, no read.
        let req = v1::ReadLog { attempt_id: 7, stream: 1, ..Default::default() };
        assert!(hub.read_agent_log(other, req, Duration::from_millis(50)).await.is_none());
    }

    fn hub_in_office_for(secs: u64) -> AgentHub {
        let hub = AgentHub::new(AgentTimeouts::default());
        *hub.leader_since.lock().expect("lock") = Instant::now().checked_sub(Duration::from_secs(secs));
        hub
    }

    const NOW: Timestamp = Timestamp(1_800_000_000_000);

    #[test]
    fn a_node_that_just_registered_is_not_judged_before_its_session_opens() {
        let hub = hub_in_office_for(60);
        let (old, new) = (NodeId(1), NodeId(2));
        let up = [(old, Timestamp(NOW.0 - 60_000)), (new, Timestamp(NOW.0 - 50))];
        let down: Vec<NodeId> = hub.overdue(&up, NOW).into_iter().map(|(n, _)| n).collect();
        assert_eq!(down, vec![old], "only the node registered a minute ago without a session");
        // Past the node-down timeout, the new node is judged like any other.
        let later = Timestamp(NOW.0 + 5_000);
        let down: Vec<NodeId> = hub.overdue(&up, later).into_iter().map(|(n, _)| n).collect();
        assert_eq!(down, vec![old, new]);
        // Once its session is open it is judged by what its agent says instead.
        hub.open(new, String::new());
        let down: Vec<NodeId> = hub.overdue(&up, later).into_iter().map(|(n, _)| n).collect();
        assert_eq!(down, vec![old]);
    }

    #[test]
    fn forgiving_clears_the_silence_seen_while_frozen() {
        let hub = hub_in_office_for(60);
        let (talking, closed, absent) = (NodeId(1), NodeId(2), NodeId(3));
        hub.open(talking, String::new());
        hub.open(closed, String::new());
        let long_ago = Instant::now() - Duration::from_secs(30);
        if let Ok(mut s) = hub.sessions.lock() {
            s.get_mut(&talking).unwrap().last_seen = long_ago;
            s.get_mut(&closed).unwrap().closed_at = Some(long_ago);
        }
        let up = [talking, closed, absent].map(|n| (n, Timestamp(NOW.0 - 60_000)));
        assert_eq!(hub.overdue(&up, NOW).len(), 3, "all three look overdue after the freeze");
        hub.forgive();
        assert!(hub.overdue(&up, NOW).is_empty(), "{:?}", hub.overdue(&up, NOW));
    }

    #[test]
    fn a_new_leader_waits_the_node_down_timeout_before_judging_nodes_without_sessions() {
        let hub = hub_in_office_for(1);
        let up = [(NodeId(1), Timestamp(NOW.0 - 60_000))];
        assert!(hub.overdue(&up, NOW).is_empty());
        let hub = hub_in_office_for(10);
        let verdict = hub.overdue(&up, NOW);
        assert_eq!(verdict.len(), 1);
        assert!(verdict[0].1.contains("did not connect"), "{}", verdict[0].1);
    }
}
