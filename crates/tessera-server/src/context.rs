//! What every service of one server shares: the Raft handle, the peers, the agents' hub, the
//! leader's live view and logs, this server's TLS, and the ways to write, read and reach the
//! leader. The services (`api::*`) and the agents' side (`agents`) build on it; it depends on
//! neither.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tessera_core::State;
use tessera_core::acl::{Principal, Resource, Rpc};
use tessera_core::command::{Command, Event};
use tessera_core::model::{JobId, NodeId};
use tessera_proto::convert::rejection_to_status;
use tessera_proto::v1;
use tessera_raft::node::ProposeError;
use tokio::sync::{Notify, broadcast};
use tokio_stream::Stream;
use tonic::{Request, Status};

use crate::raft_loop::RaftHandle;
use crate::sm::{Applied, Outcome, encode_entry};
use crate::transport::Transport;

/// How long a write may wait for its entry to apply, elections included.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::clock::now;

/// State shared by every service of one server.
pub struct Shared {
    /// This server's id.
    pub id: u64,
    /// The Raft thread.
    pub raft: RaftHandle,
    /// Peers.
    pub transport: Arc<Transport>,
    /// Applied events.
    pub events: broadcast::Sender<Arc<Applied>>,
    /// Wakes the placement loop.
    pub plan_now: Arc<Notify>,
    /// The agents' sessions and liveness (meaningful on the leader).
    pub agents: crate::hub::AgentHub,
    /// Shard output sent by the agents (kept on the leader).
    pub logs: crate::logs::LogStore,
    /// Progress and telemetry from the agents' heartbeats (kept on the leader).
    pub live: crate::live::LiveView,
    /// A connection to the leader for passing reads on, by the leader's address.
    pub leader_read_channel: std::sync::Mutex<Option<(String, tonic::transport::Channel)>>,
    /// TLS (or not) for connections to other servers.
    pub security: tessera_tls::Security,
    /// Who may do what: the token index and the decision.
    pub auth: Arc<crate::auth::Auth>,
    /// Why each job the last planning round looked at still waits (kept on the leader; empty
    /// elsewhere). Advice for `job list` and `job why`, never state.
    pub waiting: std::sync::Mutex<Arc<Waiting>>,
}

/// The last planning round's reasons, by job.
pub type Waiting = std::collections::BTreeMap<tessera_core::JobId, tessera_core::planner::WaitReason>;

impl Shared {
    /// The last planning round's reasons (shared, not copied).
    pub fn waiting(&self) -> Arc<Waiting> {
        match self.waiting.lock() {
            Ok(w) => w.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Keep a planning round's reasons.
    pub fn set_waiting(&self, w: Waiting) {
        match self.waiting.lock() {
            Ok(mut cur) => *cur = Arc::new(w),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(w),
        }
    }
}

/// Marks a request one server passed to the leader, so it is never passed on again.
pub const FORWARDED: &str = "x-tessera-forwarded";

/// `msg` as a request passed on to the leader, on behalf of the principal of `original`
/// (the leader believes that header only from a server certificate).
pub fn forwarded<T, U>(msg: T, original: &Request<U>) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(p) = original.extensions().get::<Principal>() {
        crate::auth::set_on_behalf(r.metadata_mut(), p);
    }
    if let Some(a) = original.metadata().get("authorization") {
        r.metadata_mut().insert("authorization", a.clone());
    }
    r
}

/// The principal the auth layer found for a request (`Insecure` where no layer ran, as in
/// unit tests that call a service directly).
pub fn principal<T>(req: &Request<T>) -> Principal {
    req.extensions().get::<Principal>().cloned().unwrap_or(Principal::Insecure)
}

/// Whether a read passed to the leader failed in a way worth answering locally instead.
pub fn leader_unreachable(s: &Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

pub fn unavailable(e: ProposeError) -> Status {
    match e {
        ProposeError::Invalid(m) => Status::failed_precondition(m),
        other => Status::unavailable(other.to_string()),
    }
}

impl Shared {
    /// Propose a command and wait for its outcome. It is proposed again while no leader is
    /// known, and, for a command that may be applied twice ([`Command::repeatable`]), when the
    /// leader changed before it applied; any other write whose leader changed fails at once
    /// with UNAVAILABLE (its outcome unknown) instead of waiting out [`WRITE_TIMEOUT`].
    pub async fn write(&self, cmd: &Command) -> Result<Vec<Event>, Status> {
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let result = loop {
            match self.raft.propose(encode_entry(cmd, now())).await {
                Err(ProposeError::NoLeader) if self.until_leader(deadline).await => {}
                Err(ProposeError::LeaderChanged) if cmd.repeatable() && self.until_leader(deadline).await => {
                    tracing::info!(kind = cmd.kind(), "proposed again after the leader changed");
                    metrics::counter!("tessera_proposals_repeated_total", "kind" => cmd.kind()).increment(1);
                }
                other => break other,
            }
        };
        metrics::histogram!("tessera_proposal_seconds", "kind" => cmd.kind()).record(started.elapsed().as_secs_f64());
        match result.map_err(unavailable)? {
            Outcome::Applied(events) => {
                self.plan_now.notify_one();
                Ok(events)
            }
            Outcome::Rejected(r) => Err(rejection_to_status(&r)),
            Outcome::Undecodable(m) => Err(Status::internal(m)),
        }
    }

    /// Propose a judgement only a leader may make, from what it alone has seen (an agent's
    /// silence, a shard's stalled progress): once, here, and only while this server leads.
    /// Never forwarded, so a leader deposed while frozen cannot have its stale verdicts
    /// committed by its successor (see [`tessera_raft::node::RaftNode::propose_as_leader`]).
    pub async fn write_as_leader(&self, cmd: &Command) -> Result<Vec<Event>, Status> {
        match self.raft.propose_as_leader(encode_entry(cmd, now())).await.map_err(unavailable)? {
            Outcome::Applied(events) => {
                self.plan_now.notify_one();
                Ok(events)
            }
            Outcome::Rejected(r) => Err(rejection_to_status(&r)),
            Outcome::Undecodable(m) => Err(Status::internal(m)),
        }
    }

    /// Wait until a leader is known (a proposal made then reaches it), at most until
    /// `deadline`; false when the deadline came first. At least a short pause, so that a
    /// status not yet updated cannot spin the caller.
    async fn until_leader(&self, deadline: tokio::time::Instant) -> bool {
        let pause = Duration::from_millis(10);
        if tokio::time::Instant::now() + pause >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        let mut status = self.raft.watch_status();
        tokio::time::timeout_at(deadline, status.wait_for(|s| s.leader != 0)).await.is_ok_and(|r| r.is_ok())
    }

    /// On a follower, a connection to the leader, for reads that should show the leader's live
    /// view (progress, telemetry). None on the leader, for stale reads (they are answered
    /// locally by definition), for a request already passed on once, and with no known leader.
    pub fn leader_for_read<T>(&self, req: &Request<T>, consistency: i32) -> Option<tonic::transport::Channel> {
        if consistency == v1::ReadConsistency::Stale as i32 || req.metadata().contains_key(FORWARDED) {
            return None;
        }
        let s = self.raft.status();
        if s.role == tessera_raft::StateRole::Leader || s.leader == 0 {
            return None;
        }
        let addr = self.transport.peers().get(&s.leader).cloned()?;
        let mut cached = self.leader_read_channel.lock().ok()?;
        if let Some((a, ch)) = cached.as_ref()
            && *a == addr
        {
            return Some(ch.clone());
        }
        let ep = self.security.endpoint(&addr).ok()?.connect_timeout(Duration::from_secs(1)).timeout(WRITE_TIMEOUT);
        let ch = self.security.connect_lazy(&ep);
        *cached = Some((addr, ch.clone()));
        Some(ch)
    }

    /// A connection to the current leader, for the few calls only it can answer.
    pub async fn leader_channel(&self) -> Result<tonic::transport::Channel, Status> {
        let leader = self.raft.status().leader;
        let addr = self
            .transport
            .peers()
            .get(&leader)
            .cloned()
            .ok_or_else(|| Status::unavailable("no leader is known; retry"))?;
        let ep = self.security.endpoint(&addr).map_err(|e| Status::internal(e.to_string()))?;
        self.security.connect(&ep).await.map_err(|e| Status::unavailable(format!("leader at {addr} unreachable: {e}")))
    }

    /// Read the state: linearizable by default, or this server's applied state.
    pub async fn read<T: Send + 'static>(
        &self,
        consistency: i32,
        f: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, Status> {
        if consistency == v1::ReadConsistency::Stale as i32 {
            return self
                .raft
                .local(move |n| f(&n.state_machine().state))
                .await
                .map_err(|e| Status::unavailable(e.to_string()));
        }
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let f = Arc::new(std::sync::Mutex::new(Some(f)));
        loop {
            let g = f.clone();
            let r = self.raft.read(move |sm| g.lock().ok().and_then(|mut g| g.take()).map(|f| f(&sm.state))).await;
            match r {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => return Err(Status::internal("read ran twice")),
                Err(ProposeError::Timeout | ProposeError::NoLeader | ProposeError::LeaderChanged)
                    if self.until_leader(deadline).await => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
    }
}

/// The job a request names: 0 is "unset" in proto3, so it is refused.
pub fn job_id(id: u64) -> Result<JobId, Status> {
    if id == 0 { Err(Status::invalid_argument("job_id: required (non-zero)")) } else { Ok(JobId(id)) }
}

/// The node a request names, by id or by name.
pub fn find_node(state: &State, r: &Option<v1::NodeRef>) -> Result<NodeId, Status> {
    let node = match r.as_ref().and_then(|r| r.node.as_ref()) {
        Some(v1::node_ref::Node::Id(id)) => state.node(NodeId(*id)).map(|n| n.id),
        Some(v1::node_ref::Node::Name(name)) => state.node_by_name(name).map(|n| n.id),
        None => return Err(Status::invalid_argument("node: required (id or name)")),
    };
    node.ok_or_else(|| Status::not_found(format!("no node {r:?}")))
}

/// One page of a listing, from a request's `page_size` and `page_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Items per page: 100 when unset, at most 1000.
    pub size: usize,
    /// The first id the page may hold (the token is the last id of the page before).
    pub first: u64,
}

/// Check a listing's `page_size` and `page_token` (a token is the last id of the page before,
/// so it is below `u64::MAX`).
pub fn page(page_size: u32, page_token: &str) -> Result<Page, Status> {
    let size = match page_size {
        0 => 100,
        n if n <= 1000 => n as usize,
        n => return Err(Status::invalid_argument(format!("page_size: {n} is more than 1000"))),
    };
    let not_ours = || Status::invalid_argument("page_token: not a token from this server");
    let first = if page_token.is_empty() {
        1
    } else {
        page_token.parse::<u64>().ok().and_then(|after| after.checked_add(1)).ok_or_else(not_ours)?
    };
    Ok(Page { size, first })
}

/// A boxed response stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
impl Shared {
    /// The handler-level check, once the resource is known: the same decision the auth layer
    /// made for the rpc, now for this resource.
    pub fn authorize<T>(&self, req: &Request<T>, rpc: Rpc, res: Resource<'_>) -> Result<(), Status> {
        self.auth.authorize(&principal(req), rpc, res)
    }
}

#[cfg(test)]
mod tests {
    /// Found by the grpc_requests fuzz target: the page token u64::MAX made the first id of
    /// the page overflow (a panic in debug builds; in release the listing started over).
    #[test]
    fn page_tokens_are_checked() {
        use super::{Page, page};
        assert_eq!(page(0, "").unwrap(), Page { size: 100, first: 1 });
        assert_eq!(page(10, "41").unwrap(), Page { size: 10, first: 42 });
        for bad in ["18446744073709551615", "18446744073709551616", "-1", "x"] {
            let err = page(0, bad).unwrap_err();
            assert!(err.message().starts_with("page_token:"), "{bad}: {}", err.message());
        }
        assert!(page(1001, "").unwrap_err().message().starts_with("page_size:"));
    }
}
