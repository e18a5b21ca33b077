//! The gRPC services of a server. Any server answers any request: writes are proposed to
//! Raft here (raft-rs forwards a follower's proposal to the leader) and answered once applied;
//! reads are linearizable (ReadIndex) unless the request asks for a stale read.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_core::command::{Command, Event};
use tessera_core::model::{DrainReason, JobId, NodeId};
use tessera_core::{State, Timestamp};
use tessera_proto::convert::{job_state_from_proto, job_to_proto, node_to_proto, rejection_to_status, spec_from_proto};
use tessera_proto::v1;
use tessera_raft::eraftpb::ConfChangeType;
use tessera_raft::node::ProposeError;
use tokio::sync::{Notify, broadcast};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::raft_loop::RaftHandle;
use crate::sm::{Applied, Outcome, encode_entry};
use crate::transport::{MAX_RAFT_MESSAGE, Transport};

/// How long a write may wait for its entry to apply, elections included.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// This server's clock, stamped on the commands it proposes (the entry carries it, so every
/// server applies the same time).
pub fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
}

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
    pub agents: crate::agents::AgentHub,
    /// Shard output sent by the agents (kept on the leader).
    pub logs: crate::logs::LogStore,
    /// Progress and telemetry from the agents' heartbeats (kept on the leader).
    pub live: crate::live::LiveView,
    /// A connection to the leader for passing reads on, by the leader's address.
    pub leader_read_channel: std::sync::Mutex<Option<(String, tonic::transport::Channel)>>,
}

/// Marks a request one server passed to the leader, so it is never passed on again.
const FORWARDED: &str = "x-tessera-forwarded";

/// `msg` as a request passed on to the leader.
fn forwarded<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// Whether a read passed to the leader failed in a way worth answering locally instead.
fn leader_unreachable(s: &Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

fn unavailable(e: ProposeError) -> Status {
    match e {
        ProposeError::Invalid(m) => Status::failed_precondition(m),
        other => Status::unavailable(other.to_string()),
    }
}

impl Shared {
    /// Propose a command and wait for its outcome; retries while no leader is known.
    pub async fn write(&self, cmd: &Command) -> Result<Vec<Event>, Status> {
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let mut backoff = Duration::from_millis(20);
        let result = loop {
            match self.raft.propose(encode_entry(cmd, now())).await {
                Err(ProposeError::NoLeader) if tokio::time::Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
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
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .timeout(WRITE_TIMEOUT)
            .connect_lazy();
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
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("leader at {addr} unreachable: {e}")))
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
                Err(ProposeError::Timeout | ProposeError::NoLeader) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
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

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `JobService`.
pub struct Jobs(pub Arc<Shared>);

#[tonic::async_trait]
impl v1::job_service_server::JobService for Jobs {
    async fn submit_job(&self, req: Request<v1::SubmitJobRequest>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        let req = req.into_inner();
        let spec = spec_from_proto(req.spec.ok_or_else(|| Status::invalid_argument("spec: required"))?)
            .map_err(|e| tessera_proto::convert::spec_error_to_status(&e))?;
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        let events = self.0.write(&Command::SubmitJob { spec, idempotency_key: key }).await?;
        let revision = self.0.raft.status().applied;
        for e in events {
            if let Event::JobSubmitted { job, deduplicated } = e {
                return Ok(Response::new(v1::SubmitJobResponse { job_id: job.0, deduplicated, revision }));
            }
        }
        Err(Status::internal("the submission applied without creating a job"))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::GetJobResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::job_service_client::JobServiceClient::new(ch).get_job(forwarded(*req.get_ref())).await {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let req = req.into_inner();
        let id = job_id(req.job_id)?;
        let job = self.0.read(req.consistency, move |s| s.job(id).map(|j| job_to_proto(j, s))).await?;
        let mut job = job.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        self.0.live.overlay_job(&mut job);
        Ok(Response::new(v1::GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::job_service_client::JobServiceClient::new(ch).list_jobs(forwarded(req.get_ref().clone())).await {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let req = req.into_inner();
        let mut states = Vec::new();
        for (i, s) in req.states.iter().enumerate() {
            if let Some(s) = job_state_from_proto(*s, &format!("states[{i}]")).map_err(Status::from)? {
                states.push(s);
            }
        }
        let Page { size: page_size, first } = page(req.page_size, &req.page_token)?;
        let (tenant, finished, shards) = (req.tenant, req.include_finished, req.include_shards);
        let (jobs, next) = self
            .0
            .read(req.consistency, move |s| {
                let mut out = Vec::new();
                let mut next = String::new();
                for job in s.jobs().range(JobId(first)..).map(|(_, j)| j) {
                    let wanted = if states.is_empty() {
                        finished || !job.state.is_terminal()
                    } else {
                        states.contains(&job.state)
                    };
                    if !wanted || (!tenant.is_empty() && job.spec.tenant != tenant) {
                        continue;
                    }
                    if out.len() == page_size {
                        next = (job.id.0 - 1).to_string();
                        break;
                    }
                    let mut p = job_to_proto(job, s);
                    if !shards {
                        p.shards.clear();
                    }
                    out.push(p);
                }
                (out, next)
            })
            .await?;
        let mut jobs = jobs;
        for j in &mut jobs {
            self.0.live.overlay_job(j);
        }
        Ok(Response::new(v1::ListJobsResponse { jobs, next_page_token: next }))
    }

    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::CancelJobResponse>, Status> {
        let req = req.into_inner();
        let id = job_id(req.job_id)?;
        let reason = (!req.reason.is_empty()).then_some(req.reason);
        match self.0.write(&Command::CancelJob { job: id, reason }).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                let state = self.0.read(0, move |s| s.job(id).map(|j| j.state)).await?;
                if let Some(state) = state.filter(|s| s.is_terminal()) {
                    return Ok(Response::new(v1::CancelJobResponse {
                        state: v1::JobState::from(state) as i32,
                        already_finished: true,
                    }));
                }
                return Err(s);
            }
            Err(s) => return Err(s),
        }
        let state = self
            .0
            .read(0, move |s| s.job(id).map(|j| j.state))
            .await?
            .ok_or_else(|| Status::not_found("job vanished"))?;
        Ok(Response::new(v1::CancelJobResponse { state: v1::JobState::from(state) as i32, already_finished: false }))
    }

    type WatchJobStream = BoxStream<v1::WatchJobResponse>;

    async fn watch_job(&self, req: Request<v1::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, 0) {
            // Progress lives on the leader: pass its stream through.
            match v1::job_service_client::JobServiceClient::new(ch).watch_job(forwarded(*req.get_ref())).await {
                Err(s) if leader_unreachable(&s) => {}
                Err(s) => return Err(s),
                Ok(r) => return Ok(Response::new(Box::pin(r.into_inner()))),
            }
        }
        let id = job_id(req.into_inner().job_id)?;
        // Subscribe before the first read so nothing applied in between is missed.
        let mut rx = self.0.events.subscribe();
        let shared = self.0.clone();
        let mut first = shared.read(0, move |s| s.job(id).map(|j| job_to_proto(j, s))).await?;
        if let Some(j) = first.as_mut() {
            shared.live.overlay_job(j);
        }
        let first = first.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut done = first.state >= v1::JobState::Succeeded as i32;
            let mut last = first.clone();
            if tx.send(Ok(v1::WatchJobResponse { job: Some(first), event: None })).await.is_err() || done {
                return;
            }
            // Every applied change to the job (read from the state), and once a second its
            // progress from the heartbeats (the last state read, overlaid again: no Raft-thread
            // work for a watcher while nothing is applied).
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !done {
                let reread = tokio::select! {
                    r = rx.recv() => match r {
                        Ok(applied) => applied.events.iter().any(|e| event_job(e) == Some(id)),
                        Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => false,
                };
                let mut job = if reread {
                    let Ok(Some(job)) = shared
                        .read(v1::ReadConsistency::Stale as i32, move |s| s.job(id).map(|j| job_to_proto(j, s)))
                        .await
                    else {
                        return;
                    };
                    job
                } else {
                    last.clone()
                };
                shared.live.overlay_job(&mut job);
                if job == last {
                    continue;
                }
                last = job.clone();
                done = job.state >= v1::JobState::Succeeded as i32;
                if tx.send(Ok(v1::WatchJobResponse { job: Some(job), event: None })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    type JobLogsStream = BoxStream<v1::JobLogsResponse>;

    async fn job_logs(&self, req: Request<v1::JobLogsRequest>) -> Result<Response<Self::JobLogsStream>, Status> {
        let req = req.into_inner();
        let id = job_id(req.job_id)?;
        let status = self.0.raft.status();
        if status.role != tessera_raft::StateRole::Leader {
            // Output lives on the leader: pass the stream through from it.
            let ch = self.0.leader_channel().await?;
            let stream = v1::job_service_client::JobServiceClient::new(ch).job_logs(req).await?.into_inner();
            return Ok(Response::new(Box::pin(stream)));
        }
        if !self.0.read(0, move |s| s.job(id).is_some()).await? {
            return Err(Status::not_found(format!("no job {id}")));
        }
        let streams: Vec<i32> = match v1::LogSelection::try_from(req.streams) {
            Ok(v1::LogSelection::Stdout) => vec![1],
            Ok(v1::LogSelection::Stderr) => vec![2],
            Ok(_) => vec![1, 2],
            Err(_) => return Err(Status::invalid_argument(format!("streams: {} is not a LogSelection", req.streams))),
        };
        let mut rx = self.0.logs.subscribe();
        let kept = self.0.logs.read(id, req.shard_index, req.attempt, &streams, req.tail_bytes);
        let shared = self.0.clone();
        let (tx, out) = tokio::sync::mpsc::channel(256);
        let to_msg = |c: &crate::logs::Chunk| v1::JobLogsResponse {
            shard_index: c.owner.shard,
            attempt_id: c.attempt_id,
            attempt: c.owner.attempt,
            stream: c.stream,
            offset: c.offset,
            data: c.data.clone(),
        };
        tokio::spawn(async move {
            let mut sent: std::collections::BTreeMap<(u64, i32), u64> = std::collections::BTreeMap::new();
            for c in &kept {
                sent.insert((c.attempt_id, c.stream), c.offset + c.data.len() as u64);
                if tx.send(Ok(to_msg(c))).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            let min_attempt: std::collections::BTreeMap<u32, u32> =
                kept.iter().map(|c| (c.owner.shard, c.owner.attempt)).collect();
            let mut finished_at: Option<tokio::time::Instant> = None;
            let mut check = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    got = rx.recv() => {
                        let c = match got {
                            Ok(c) => c,
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        let wanted = c.owner.job == id
                            && req.shard_index.is_none_or(|s| c.owner.shard == s)
                            && streams.contains(&c.stream)
                            && match req.attempt {
                                Some(n) => c.owner.attempt == n,
                                None => min_attempt.get(&c.owner.shard).is_none_or(|m| c.owner.attempt >= *m),
                            };
                        let end = sent.entry((c.attempt_id, c.stream)).or_insert(0);
                        if !wanted || c.offset + (c.data.len() as u64) <= *end {
                            continue;
                        }
                        *end = c.offset + c.data.len() as u64;
                        if tx.send(Ok(to_msg(&c))).await.is_err() {
                            return;
                        }
                    }
                    _ = check.tick() => {
                        if let Some(t) = finished_at {
                            // The final output of an attempt arrives just before its exit.
                            if t.elapsed() > Duration::from_secs(1) {
                                return;
                            }
                        } else if shared.read(v1::ReadConsistency::Stale as i32, move |s| s.job(id).is_none_or(|j| j.state.is_terminal())).await.unwrap_or(true) {
                            finished_at = Some(tokio::time::Instant::now());
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }
}

fn event_job(e: &Event) -> Option<JobId> {
    match e {
        Event::JobSubmitted { job, .. }
        | Event::JobStateChanged { job, .. }
        | Event::ShardAssigned { job, .. }
        | Event::StopRequested { job, .. }
        | Event::ShardStateChanged { job, .. }
        | Event::CheckpointRecorded { job, .. }
        | Event::PlacementRejected { job, .. } => Some(*job),
        _ => None,
    }
}

/// `NodeService`.
pub struct Nodes(pub Arc<Shared>);

impl Nodes {
    async fn node_write(
        &self,
        node: Option<v1::NodeRef>,
        make: impl FnOnce(NodeId) -> Command,
    ) -> Result<v1::Node, Status> {
        let id = self.0.read(0, move |s| find_node(s, &node)).await??;
        self.0.write(&make(id)).await?;
        let node = self.0.read(0, move |s| s.node(id).map(|n| node_to_proto(n, s))).await?;
        node.ok_or_else(|| Status::not_found(format!("{id} vanished")))
    }
}

#[tonic::async_trait]
impl v1::node_service_server::NodeService for Nodes {
    async fn list_nodes(&self, req: Request<v1::ListNodesRequest>) -> Result<Response<v1::ListNodesResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::node_service_client::NodeServiceClient::new(ch).list_nodes(forwarded(req.get_ref().clone())).await
            {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let req = req.into_inner();
        let Page { size: page_size, first } = page(req.page_size, &req.page_token)?;
        let cloud = tessera_proto::convert::cloud_from_proto(req.cloud, "cloud").map_err(Status::from)?;
        let (region, labels, states) = (req.region, req.labels, req.states);
        let (nodes, next) = self
            .0
            .read(req.consistency, move |s| {
                let mut out = Vec::new();
                let mut next = String::new();
                for n in s.nodes().range(NodeId(first)..).map(|(_, n)| n) {
                    let p = node_to_proto(n, s);
                    let keep = (states.is_empty() || states.contains(&p.state))
                        && cloud.is_none_or(|c| c == n.info.cloud)
                        && (region.is_empty() || region == n.info.region)
                        && labels.iter().all(|(k, v)| n.info.labels.get(k) == Some(v));
                    if !keep {
                        continue;
                    }
                    if out.len() == page_size {
                        next = (n.id.0 - 1).to_string();
                        break;
                    }
                    out.push(p);
                }
                (out, next)
            })
            .await?;
        let mut nodes = nodes;
        for n in &mut nodes {
            self.0.live.overlay_node(n);
        }
        Ok(Response::new(v1::ListNodesResponse { nodes, next_page_token: next }))
    }

    async fn get_node(&self, req: Request<v1::GetNodeRequest>) -> Result<Response<v1::GetNodeResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::node_service_client::NodeServiceClient::new(ch).get_node(forwarded(req.get_ref().clone())).await {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let req = req.into_inner();
        let r = req.node;
        let mut node = self
            .0
            .read(req.consistency, move |s| find_node(s, &r).map(|id| node_to_proto(&s.nodes()[&id], s)))
            .await??;
        self.0.live.overlay_node(&mut node);
        Ok(Response::new(v1::GetNodeResponse { node: Some(node) }))
    }

    async fn drain_node(&self, req: Request<v1::DrainNodeRequest>) -> Result<Response<v1::DrainNodeResponse>, Status> {
        let req = req.into_inner();
        let deadline = req.deadline_seconds.map(|s| now().plus_secs(s));
        let node = self
            .node_write(req.node, |node| Command::DrainNode { node, reason: DrainReason::Operator, deadline })
            .await?;
        Ok(Response::new(v1::DrainNodeResponse { node: Some(node) }))
    }

    async fn undrain_node(
        &self,
        req: Request<v1::UndrainNodeRequest>,
    ) -> Result<Response<v1::UndrainNodeResponse>, Status> {
        let node = self.node_write(req.into_inner().node, |node| Command::UndrainNode { node }).await?;
        Ok(Response::new(v1::UndrainNodeResponse { node: Some(node) }))
    }

    async fn clear_gpu_health(
        &self,
        req: Request<v1::ClearGpuHealthRequest>,
    ) -> Result<Response<v1::ClearGpuHealthResponse>, Status> {
        let req = req.into_inner();
        let r = req.node.clone();
        let (id, all) = self
            .0
            .read(0, move |s| {
                find_node(s, &r).map(|id| (id, s.nodes()[&id].gpus.iter().map(|g| g.index).collect::<Vec<_>>()))
            })
            .await??;
        let gpus = if req.gpu_indices.is_empty() { all } else { req.gpu_indices };
        let reason = if req.reason.is_empty() { "cleared by an operator".to_string() } else { req.reason };
        for gpu in gpus {
            self.0.write(&Command::SetGpuHealth { node: id, gpu, healthy: true, reason: reason.clone() }).await?;
        }
        let node = self.0.read(0, move |s| s.node(id).map(|n| node_to_proto(n, s))).await?;
        Ok(Response::new(v1::ClearGpuHealthResponse { node }))
    }
}

/// `RaftService`: the transport between servers.
pub struct RaftRpc(pub Arc<Shared>);

#[tonic::async_trait]
impl v1::raft_service_server::RaftService for RaftRpc {
    async fn send(&self, req: Request<v1::RaftBatch>) -> Result<Response<v1::RaftAck>, Status> {
        let b = req.into_inner();
        if b.to_id != self.0.id {
            return Err(Status::failed_precondition(format!("this is server {}, not {}", self.0.id, b.to_id)));
        }
        // Decode only what known members send (the protobuf 2 runtime is not for hostile input).
        if !self.0.transport.is_peer(b.from_id) {
            return Err(Status::permission_denied(format!("server {} is not a member of this cluster", b.from_id)));
        }
        let mut accepted = 0;
        for bytes in &b.messages {
            if bytes.len() > MAX_RAFT_MESSAGE {
                return Err(Status::invalid_argument("raft message too large"));
            }
            let m = <tessera_raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(bytes)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            if m.from != b.from_id || m.to != self.0.id {
                return Err(Status::invalid_argument("raft message addressed inconsistently with its batch"));
            }
            self.0.raft.send(crate::raft_loop::Request::Step(m)).map_err(|e| Status::unavailable(e.to_string()))?;
            accepted += 1;
        }
        Ok(Response::new(v1::RaftAck { server_id: self.0.id, accepted }))
    }
}

/// `ClusterService`.
pub struct Cluster(pub Arc<Shared>);

fn role(r: tessera_raft::StateRole) -> v1::MemberRole {
    match r {
        tessera_raft::StateRole::Leader => v1::MemberRole::Leader,
        tessera_raft::StateRole::Follower => v1::MemberRole::Follower,
        tessera_raft::StateRole::Candidate => v1::MemberRole::Candidate,
        tessera_raft::StateRole::PreCandidate => v1::MemberRole::PreCandidate,
    }
}

impl Cluster {
    async fn members(&self) -> Vec<v1::Member> {
        let s = self.0.raft.status();
        let mut peers = self.0.transport.peers();
        let me = self
            .0
            .raft
            .local(|n| n.state_machine().members.addresses.get(&n.status().id).cloned())
            .await
            .ok()
            .flatten();
        peers.insert(s.id, me.unwrap_or_default());
        let leader = (s.leader != 0).then_some(s.leader);
        let mut out = Vec::new();
        for (id, kind) in s
            .voters
            .iter()
            .map(|v| (*v, v1::MemberKind::Voter))
            .chain(s.learners.iter().map(|l| (*l, v1::MemberKind::Learner)))
        {
            let mut m = v1::Member {
                id,
                address: peers.get(&id).cloned().unwrap_or_default(),
                kind: kind as i32,
                leader_id: leader,
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            };
            if id == s.id {
                m.role = role(s.role) as i32;
                m.term = s.term;
                m.commit_index = s.commit;
                m.applied_index = s.applied;
                m.reachable = true;
            } else if let Ok(Some(remote)) = remote_status(&m.address).await {
                m.role = remote.role;
                m.term = remote.term;
                m.commit_index = remote.commit_index;
                m.applied_index = remote.applied_index;
                m.reachable = true;
            }
            if s.role == tessera_raft::StateRole::Leader {
                m.match_index = self.0.raft.local(move |n| n.matched(id)).await.ok().flatten();
            }
            out.push(m);
        }
        out
    }

    async fn leader_client(
        &self,
    ) -> Result<v1::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>, Status> {
        Ok(v1::cluster_service_client::ClusterServiceClient::new(self.0.leader_channel().await?))
    }
}

/// Header asking a server to describe only itself (no fan-out).
const LOCAL_ONLY: &str = "x-tessera-local-status";

async fn remote_status(addr: &str) -> Result<Option<v1::Member>, Status> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_millis(500));
    let Ok(ch) = ep.connect().await else { return Ok(None) };
    let mut req = Request::new(v1::StatusRequest {});
    req.metadata_mut().insert(LOCAL_ONLY, tonic::metadata::MetadataValue::from_static("1"));
    let r = v1::cluster_service_client::ClusterServiceClient::new(ch).status(req).await?;
    let r = r.into_inner();
    Ok(r.members.into_iter().find(|m| m.id == r.responder_id))
}

#[tonic::async_trait]
impl v1::cluster_service_server::ClusterService for Cluster {
    async fn status(&self, req: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        let s = self.0.raft.status();
        let members = if req.metadata().contains_key(LOCAL_ONLY) {
            vec![v1::Member {
                id: s.id,
                role: role(s.role) as i32,
                term: s.term,
                commit_index: s.commit,
                applied_index: s.applied,
                leader_id: (s.leader != 0).then_some(s.leader),
                reachable: true,
                ..Default::default()
            }]
        } else {
            self.members().await
        };
        Ok(Response::new(v1::StatusResponse {
            members,
            leader_id: (s.leader != 0).then_some(s.leader),
            responder_id: s.id,
        }))
    }

    async fn add_server(&self, req: Request<v1::AddServerRequest>) -> Result<Response<v1::AddServerResponse>, Status> {
        let r = req.into_inner();
        if r.id == 0 || r.address.is_empty() {
            return Err(Status::invalid_argument("id and address: required"));
        }
        let s = self.0.raft.status();
        if s.role != tessera_raft::StateRole::Leader {
            return self.leader_client().await?.add_server(r).await;
        }
        if !s.voters.contains(&r.id) && !s.learners.contains(&r.id) {
            self.0.transport.set_peer(r.id, r.address.clone());
            self.0
                .raft
                .conf_change(ConfChangeType::AddLearnerNode, r.id, r.address.clone())
                .await
                .map_err(unavailable)?;
        }
        if !r.learner && !self.0.raft.status().voters.contains(&r.id) {
            // Promote once the learner has caught up with the leader's log.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let id = r.id;
                let (matched, last) = self
                    .0
                    .raft
                    .local(move |n| (n.matched(id).unwrap_or(0), n.status().last_index))
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                if matched + 100 >= last {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Status::deadline_exceeded(format!(
                        "server {id} did not catch up (at {matched} of {last})"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.0.raft.conf_change(ConfChangeType::AddNode, r.id, r.address.clone()).await.map_err(unavailable)?;
        }
        Ok(Response::new(v1::AddServerResponse { index: self.0.raft.status().applied, members: self.members().await }))
    }

    async fn remove_server(
        &self,
        req: Request<v1::RemoveServerRequest>,
    ) -> Result<Response<v1::RemoveServerResponse>, Status> {
        let r = req.into_inner();
        let s = self.0.raft.status();
        if !s.voters.contains(&r.id) && !s.learners.contains(&r.id) {
            return Err(Status::not_found(format!("server {} is not a member", r.id)));
        }
        if s.voters == [r.id] {
            return Err(Status::failed_precondition("cannot remove the last voter"));
        }
        if s.leader == r.id {
            // Hand leadership to another voter first (raft-rs waits until it has caught up).
            let target = s.voters.iter().copied().find(|v| *v != r.id).unwrap_or(0);
            let id = r.id;
            self.0
                .raft
                .local(move |n| n.transfer_leader(target))
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while self.0.raft.status().leader == id || self.0.raft.status().leader == 0 {
                if tokio::time::Instant::now() > deadline {
                    return Err(Status::unavailable(format!("leadership did not move off server {id}; retry")));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if self.0.raft.status().role != tessera_raft::StateRole::Leader {
            return self.leader_client().await?.remove_server(r).await;
        }
        self.0.raft.conf_change(ConfChangeType::RemoveNode, r.id, String::new()).await.map_err(unavailable)?;
        Ok(Response::new(v1::RemoveServerResponse {
            index: self.0.raft.status().applied,
            members: self.members().await,
        }))
    }

    type SnapshotStream = BoxStream<v1::SnapshotResponse>;

    async fn snapshot(&self, _req: Request<v1::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let (data, index) = self.0.read(0, |s| (s.snapshot(), s.applied_index())).await?;
        let header = v1::SnapshotHeader {
            index,
            term: self.0.raft.status().term,
            size_bytes: data.len() as u64,
            crc32: crc32(&data),
            server_id: self.0.id,
            created_unix_ms: now().0,
            format_version: tessera_core::state::SNAPSHOT_VERSION,
        };
        let mut items = vec![Ok(v1::SnapshotResponse { chunk: Some(v1::snapshot_response::Chunk::Header(header)) })];
        for c in data.chunks(1024 * 1024) {
            items.push(Ok(v1::SnapshotResponse { chunk: Some(v1::snapshot_response::Chunk::Data(c.to_vec())) }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// CRC-32 (IEEE 802.3, as zlib computes it), as the snapshot header promises.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// `AgentService`: one bidirectional stream per agent, served by the leader.
pub struct Agents(pub Arc<Shared>);

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for Agents {
    type SessionStream = BoxStream<v1::ServerMessage>;

    async fn session(
        &self,
        req: Request<tonic::Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let rx = crate::agents::session(self.0.clone(), req.into_inner()).await?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
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

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
    }
}
