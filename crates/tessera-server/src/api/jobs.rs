//! `JobService`: submit, read, cancel and watch jobs, and follow their logs. A submitter acts
//! only on its tenants' jobs; env values are shown only to the job's tenant and to admins.

use std::sync::Arc;
use std::time::Duration;

use tessera_core::acl::{Resource, Rpc};
use tessera_core::command::{Command, Event};
use tessera_core::model::{JobId, NodeId};
use tessera_core::timeline::{events_after, events_total};
use tessera_core::why::Briefs;
use tessera_proto::convert::{
    job_event_to_proto, job_events_to_proto, job_finished_event, job_state_from_proto, job_to_proto, pending_reason,
    spec_from_proto, why_to_proto,
};
use tessera_proto::v1;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::auth::note;
use crate::context::{BoxStream, Shared, forwarded, job_id, leader_unreachable, principal};

/// `JobService`.
pub struct Jobs(pub Arc<Shared>);

#[tonic::async_trait]
impl v1::job_service_server::JobService for Jobs {
    async fn submit_job(&self, req: Request<v1::SubmitJobRequest>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        let who = principal(&req);
        let spec =
            spec_from_proto(req.get_ref().spec.clone().ok_or_else(|| Status::invalid_argument("spec: required"))?)
                .map_err(|e| tessera_proto::convert::spec_error_to_status(&e))?;
        self.0.authorize(&req, Rpc::SubmitJob, Resource::Tenant(&spec.tenant))?;
        // A job may wait on another's end only if its submitter may read that job: a dependency
        // tells whether the job exists and how it ended.
        let deps: Vec<u64> = spec.after_ok.iter().chain(&spec.after_any).copied().collect();
        if !deps.is_empty() {
            let tenants = self
                .0
                .read(0, move |s| {
                    deps.iter().filter_map(|d| s.job(JobId(*d)).map(|j| j.spec.tenant.clone())).collect::<Vec<_>>()
                })
                .await?;
            for t in &tenants {
                self.0.authorize(&req, Rpc::GetJob, Resource::Tenant(t))?;
            }
        }
        note(&req, format!("tenant {}", spec.tenant));
        let req_ref = &req;
        let req = req_ref.get_ref().clone();
        // An unset priority takes the tenant's default, decided at apply like everything else.
        let priority_defaulted = req.spec.as_ref().is_some_and(|s| s.priority.is_none());
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        let cmd =
            Command::SubmitJob { spec, idempotency_key: key, priority_defaulted, submitted_by: Some(who.audit_name()) };
        let events = self.0.write(&cmd).await?;
        let revision = self.0.raft.status().applied;
        for e in events {
            if let Event::JobSubmitted { job, deduplicated } = e {
                note(req_ref, format!("job {}", job.0));
                return Ok(Response::new(v1::SubmitJobResponse { job_id: job.0, deduplicated, revision }));
            }
        }
        Err(Status::internal("the submission applied without creating a job"))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::GetJobResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::job_service_client::JobServiceClient::new(ch).get_job(forwarded(*req.get_ref(), &req)).await {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let id = job_id(req.get_ref().job_id)?;
        let (waiting, now) = (self.0.waiting(), crate::clock::now());
        let job = self
            .0
            .read(req.get_ref().consistency, move |s| {
                s.job(id).map(|j| {
                    let mut p = job_to_proto(j, s);
                    p.pending_reason = pending_reason(&mut Briefs::new(s, now), j, waiting.get(&id));
                    p
                })
            })
            .await?;
        let mut job = job.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        self.0.authorize(&req, Rpc::GetJob, Resource::Tenant(job_tenant(&job)))?;
        redact(&req, &mut job);
        self.0.live.overlay_job(&mut job);
        Ok(Response::new(v1::GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::job_service_client::JobServiceClient::new(ch)
                .list_jobs(forwarded(req.get_ref().clone(), &req))
                .await
            {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let who = principal(&req);
        let readable = who.readable_tenants().cloned();
        if readable.is_some() && !req.get_ref().tenant.is_empty() {
            self.0.authorize(&req, Rpc::GetJob, Resource::Tenant(&req.get_ref().tenant))?;
        }
        let req = req.into_inner();
        let mut states = Vec::new();
        for (i, s) in req.states.iter().enumerate() {
            if let Some(s) = job_state_from_proto(*s, &format!("states[{i}]")).map_err(Status::from)? {
                states.push(s);
            }
        }
        let crate::context::Page { size: page_size, first } = crate::context::page(req.page_size, &req.page_token)?;
        let (tenant, finished, shards) = (req.tenant, req.include_finished, req.include_shards);
        let array = JobId(req.array_job_id);
        let (waiting, now) = (self.0.waiting(), crate::clock::now());
        let (jobs, next) = self
            .0
            .read(req.consistency, move |s| {
                let mut briefs = Briefs::new(s, now);
                let mut out = Vec::new();
                let mut next = String::new();
                for job in s.jobs().range(JobId(first)..).map(|(_, j)| j) {
                    let wanted = if states.is_empty() {
                        finished || !job.state.is_terminal()
                    } else {
                        states.contains(&job.state)
                    };
                    // One array is one row (its own record); its elements only when asked for.
                    let in_array = job.element_of.map_or(JobId(0), |e| e.array) == array;
                    if !wanted
                        || !in_array
                        || (!tenant.is_empty() && job.spec.tenant != tenant)
                        || readable.as_ref().is_some_and(|r| !r.contains(&job.spec.tenant))
                    {
                        continue;
                    }
                    if out.len() == page_size {
                        next = (job.id.0 - 1).to_string();
                        break;
                    }
                    let mut p = job_to_proto(job, s);
                    p.pending_reason = pending_reason(&mut briefs, job, waiting.get(&job.id));
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
            redact_for(&who, j);
            self.0.live.overlay_job(j);
        }
        Ok(Response::new(v1::ListJobsResponse { jobs, next_page_token: next }))
    }

    async fn explain_job(
        &self,
        req: Request<v1::ExplainJobRequest>,
    ) -> Result<Response<v1::ExplainJobResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::job_service_client::JobServiceClient::new(ch).explain_job(forwarded(*req.get_ref(), &req)).await {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let id = job_id(req.get_ref().job_id)?;
        let (waiting, now) = (self.0.waiting(), crate::clock::now());
        // On the Raft thread: one pass over the nodes, the pending jobs and the live attempts.
        let out = self
            .0
            .read(req.get_ref().consistency, move |s| {
                let job = s.job(id)?;
                let planned = waiting.get(&id);
                let why = tessera_core::why::explain(s, id, planned, now)?;
                Some((job.spec.tenant.clone(), why_to_proto(why, job.state, planned.is_some())))
            })
            .await?;
        let (tenant, answer) = out.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        self.0.authorize(&req, Rpc::ExplainJob, Resource::Tenant(&tenant))?;
        Ok(Response::new(answer))
    }

    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::CancelJobResponse>, Status> {
        let id = job_id(req.get_ref().job_id)?;
        note(&req, format!("job {id}"));
        let tenant = self.0.read(0, move |s| s.job(id).map(|j| j.spec.tenant.clone())).await?;
        let tenant = tenant.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        self.0.authorize(&req, Rpc::CancelJob, Resource::Tenant(&tenant))?;
        let req = req.into_inner();
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

    async fn job_events(&self, req: Request<v1::JobEventsRequest>) -> Result<Response<v1::JobEventsResponse>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, req.get_ref().consistency) {
            match v1::job_service_client::JobServiceClient::new(ch).job_events(forwarded(*req.get_ref(), &req)).await {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let id = job_id(req.get_ref().job_id)?;
        let found = self
            .0
            .read(req.get_ref().consistency, move |s| {
                s.job(id).map(|j| (j.spec.tenant.clone(), job_events_to_proto(j, s)))
            })
            .await?;
        let (tenant, events) = found.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        self.0.authorize(&req, Rpc::JobEvents, Resource::Tenant(&tenant))?;
        Ok(Response::new(events))
    }

    type WatchJobStream = BoxStream<v1::WatchJobResponse>;

    async fn watch_job(&self, req: Request<v1::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        if let Some(ch) = self.0.leader_for_read(&req, 0) {
            // Progress lives on the leader: pass its stream through.
            match v1::job_service_client::JobServiceClient::new(ch).watch_job(forwarded(*req.get_ref(), &req)).await {
                Err(s) if leader_unreachable(&s) => {}
                Err(s) => return Err(s),
                Ok(r) => return Ok(Response::new(Box::pin(r.into_inner()))),
            }
        }
        let id = job_id(req.get_ref().job_id)?;
        let who = principal(&req);
        // Subscribe before the first read so nothing applied in between is missed.
        let mut rx = self.0.events.subscribe();
        let shared = self.0.clone();
        let first = shared.read(0, move |s| s.job(id).map(|j| (job_to_proto(j, s), events_total(j)))).await?;
        let (mut first, mut seen) = first.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        self.0.authorize(&req, Rpc::WatchJob, Resource::Tenant(job_tenant(&first)))?;
        redact_for(&who, &mut first);
        shared.live.overlay_job(&mut first);
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut done = first.state >= v1::JobState::Succeeded as i32;
            let mut last = first.clone();
            if tx.send(Ok(v1::WatchJobResponse { job: Some(first), event: None })).await.is_err() || done {
                return;
            }
            // Every applied change to the job (read from the state, with the events recorded
            // since the last read), and once a second its progress from the heartbeats (the last
            // state read, overlaid again: no Raft-thread work for a watcher while nothing is
            // applied).
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
                let (mut job, mut events) = if reread {
                    let since = seen;
                    let Ok(Some((job, events, total))) = shared
                        .read(v1::ReadConsistency::Stale as i32, move |s| {
                            s.job(id).map(|j| (job_to_proto(j, s), watch_events(j, since, s), events_total(j)))
                        })
                        .await
                    else {
                        return;
                    };
                    seen = total;
                    (job, events)
                } else {
                    (last.clone(), Vec::new())
                };
                redact_for(&who, &mut job);
                shared.live.overlay_job(&mut job);
                events.extend(progress_events(&last, &job));
                if job == last && events.is_empty() {
                    continue;
                }
                last = job.clone();
                done = job.state >= v1::JobState::Succeeded as i32;
                if events.is_empty() {
                    if tx.send(Ok(v1::WatchJobResponse { job: Some(job), event: None })).await.is_err() {
                        return;
                    }
                    continue;
                }
                for event in events {
                    let msg = v1::WatchJobResponse { job: Some(job.clone()), event: Some(event) };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    type JobLogsStream = BoxStream<v1::JobLogsResponse>;

    async fn job_logs(&self, req: Request<v1::JobLogsRequest>) -> Result<Response<Self::JobLogsStream>, Status> {
        let id = job_id(req.get_ref().job_id)?;
        let status = self.0.raft.status();
        if status.role != tessera_raft::StateRole::Leader {
            // Output lives on the leader: pass the stream through from it (it checks again).
            let ch = self.0.leader_channel().await?;
            let fwd = forwarded(*req.get_ref(), &req);
            let stream = v1::job_service_client::JobServiceClient::new(ch).job_logs(fwd).await?.into_inner();
            return Ok(Response::new(Box::pin(stream)));
        }
        let tenant = self.0.read(0, move |s| s.job(id).map(|j| j.spec.tenant.clone())).await?;
        let tenant = tenant.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        self.0.authorize(&req, Rpc::JobLogs, Resource::Tenant(&tenant))?;
        let req = req.into_inner();
        let streams: Vec<i32> = match v1::LogSelection::try_from(req.streams) {
            Ok(v1::LogSelection::Stdout) => vec![1],
            Ok(v1::LogSelection::Stderr) => vec![2],
            Ok(_) => vec![1, 2],
            Err(_) => return Err(Status::invalid_argument(format!("streams: {} is not a LogSelection", req.streams))),
        };
        let (shard, attempt) = (req.shard_index, req.attempt);
        let on_disk =
            self.0.read(0, move |s| s.job(id).map(|j| disk_reads(j, shard, attempt))).await?.unwrap_or_default();
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
            // The attempts the state names are read from their agents' disks around what the
            // leader holds in memory (the agents send the leader only a bounded tail; a new
            // leader holds nothing of finished attempts).
            let mut kept = kept;
            for a in &on_disk {
                for stream in &streams {
                    let at = kept.iter().position(|c| c.attempt_id == a.attempt_id && c.stream == *stream);
                    let mem = at.map(|i| kept.remove(i));
                    let Ok((sent_any, end)) = stream_attempt(&shared, a, *stream, mem, req.tail_bytes, &tx).await
                    else {
                        return;
                    };
                    sent.insert((a.attempt_id, *stream), end);
                    if sent_any {
                        // This attempt's output is shown, not an older one's the leader holds.
                        kept.retain(|c| c.owner.shard != a.owner.shard || c.stream != *stream);
                    }
                }
            }
            for c in &kept {
                sent.insert((c.attempt_id, c.stream), c.offset + c.data.len() as u64);
                if tx.send(Ok(to_msg(c))).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            // Following moves on from the attempts shown (from memory or from the agents' disks).
            let mut min_attempt: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
            for (shard, attempt) in kept
                .iter()
                .map(|c| (c.owner.shard, c.owner.attempt))
                .chain(on_disk.iter().map(|a| (a.owner.shard, a.owner.attempt)))
            {
                let m = min_attempt.entry(shard).or_insert(attempt);
                *m = (*m).max(attempt);
            }
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
                        // Only what was not sent yet (part may have come from the agent's disk).
                        let mut m = to_msg(&c);
                        if m.offset < *end {
                            m.data.drain(..(*end - m.offset) as usize);
                            m.offset = *end;
                        }
                        *end = c.offset + c.data.len() as u64;
                        if tx.send(Ok(m)).await.is_err() {
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

/// An attempt whose output may have to be read from its agent's disk.
struct DiskRead {
    attempt_id: u64,
    node: NodeId,
    owner: crate::logs::Owner,
}

/// The attempts a JobLogs request reads: of each shard asked for, attempt number `attempt`
/// (found in the job's timeline), or the current or last one.
fn disk_reads(job: &tessera_core::model::Job, shard: Option<u32>, attempt: Option<u32>) -> Vec<DiskRead> {
    use tessera_core::model::JobEventKind;
    let mut out = Vec::new();
    for s in job.shards.iter().filter(|s| shard.is_none_or(|i| s.index == i)) {
        let found = match attempt {
            Some(n) => job.events.iter().find_map(|e| match (e.kind, e.attempt, e.node) {
                (JobEventKind::Placed { number }, Some(a), Some(node)) if number == n && e.shard == s.index => {
                    Some((a.0, node, n))
                }
                _ => None,
            }),
            None => s.attempt.as_ref().map(|a| (a.id.0, a.node, a.number)),
        };
        if let Some((attempt_id, node, number)) = found {
            let owner = crate::logs::Owner { job: job.id, shard: s.index, attempt: number };
            out.push(DiskRead { attempt_id, node, owner });
        }
    }
    out
}

/// Most time an agent has to answer one read of its disk.
const DISK_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes asked of an agent at once.
const DISK_READ_BYTES: u64 = 1024 * 1024;

/// Send one attempt stream: what its agent keeps on disk before `mem` (the leader's in-memory
/// chunk of it), `mem`, and what the agent keeps after it; from `tail` bytes before the end if
/// asked. An agent that is not connected or does not answer leaves what the leader holds.
/// Whether anything was sent, and the end of what was; Err when the reader went away.
async fn stream_attempt(
    shared: &Shared,
    a: &DiskRead,
    stream: i32,
    mem: Option<crate::logs::Chunk>,
    tail: Option<u64>,
    tx: &tokio::sync::mpsc::Sender<Result<v1::JobLogsResponse, Status>>,
) -> Result<(bool, u64), ()> {
    let ask = |offset: u64, max_bytes: u64| v1::ReadLog {
        request_id: 0,
        job_id: a.owner.job.0,
        shard_index: a.owner.shard,
        attempt_id: a.attempt_id,
        stream,
        offset,
        max_bytes,
    };
    let msg = |offset: u64, data: Vec<u8>| v1::JobLogsResponse {
        shard_index: a.owner.shard,
        attempt_id: a.attempt_id,
        attempt: a.owner.attempt,
        stream,
        offset,
        data,
    };
    let hub = &shared.agents;
    let mem_end = mem.as_ref().map(|m| m.offset + m.data.len() as u64);
    let mut pos = match tail {
        None => 0,
        Some(t) => match hub.read_agent_log(a.node, ask(0, 0), DISK_READ_TIMEOUT).await {
            Some(probe) if probe.found => probe.end.max(mem_end.unwrap_or(0)).saturating_sub(t),
            _ => mem_end.unwrap_or(0).saturating_sub(t),
        },
    };
    let mut sent_any = false;
    // From the agent's disk, [pos, stop): the new position.
    let fetch = async |mut pos: u64, stop: u64, sent_any: &mut bool| -> Result<u64, ()> {
        while pos < stop {
            let want = ask(pos, (stop - pos).min(DISK_READ_BYTES));
            let Some(r) = hub.read_agent_log(a.node, want, DISK_READ_TIMEOUT).await else { break };
            if !r.found || r.data.is_empty() {
                break;
            }
            let end = r.offset + r.data.len() as u64;
            tx.send(Ok(msg(r.offset, r.data))).await.map_err(|_| ())?;
            *sent_any = true;
            pos = end;
            if pos >= r.end {
                break;
            }
        }
        Ok(pos)
    };
    if let Some(m) = mem {
        if pos < m.offset {
            pos = fetch(pos, m.offset, &mut sent_any).await?;
        }
        let end = m.offset + m.data.len() as u64;
        if end > pos {
            let skip = pos.saturating_sub(m.offset) as usize;
            tx.send(Ok(msg(m.offset + skip as u64, m.data[skip..].to_vec()))).await.map_err(|_| ())?;
            sent_any = true;
            pos = end;
        }
    }
    pos = fetch(pos, u64::MAX, &mut sent_any).await?;
    Ok((sent_any, pos))
}

/// The job's events recorded after the first `seen`, numbered as JobEvents numbers them, and
/// its FINISHED event once it ended.
fn watch_events(job: &tessera_core::model::Job, seen: u64, s: &tessera_core::State) -> Vec<v1::JobEvent> {
    let mut out: Vec<v1::JobEvent> = events_after(job, seen).iter().map(|e| job_event_to_proto(e, s)).collect();
    if job.state.is_terminal() {
        out.push(job_finished_event(job));
    }
    out
}

/// PROGRESS events for the shards whose reported step moved between two reads of the job.
fn progress_events(before: &v1::Job, after: &v1::Job) -> Vec<v1::JobEvent> {
    let mut out = Vec::new();
    for s in &after.shards {
        let was = before.shards.iter().find(|b| b.index == s.index && b.attempt_id == s.attempt_id);
        if s.step == 0 || was.is_some_and(|b| b.step == s.step) {
            continue;
        }
        let of = s.total_steps.map(|t| format!(" of {t}")).unwrap_or_default();
        out.push(v1::JobEvent {
            time_unix_ms: crate::clock::now().0,
            kind: v1::JobEventKind::Progress as i32,
            shard_index: Some(s.index),
            attempt_id: s.attempt_id,
            node_id: s.node_id,
            stop_reason: v1::StopReason::Unspecified as i32,
            message: format!("step {}{of}", s.step),
            sequence: 0,
            node_name: s.node_name.clone(),
        });
    }
    out
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

fn job_tenant(job: &v1::Job) -> &str {
    job.spec.as_ref().map_or("", |s| s.tenant.as_str())
}

/// What env values look like to those who may not see them.
pub const REDACTED: &str = "(redacted)";

/// Hide the job's env values from a principal that may not see them (keys stay visible).
fn redact_for(who: &tessera_core::acl::Principal, job: &mut v1::Job) {
    if who.may_see_env(job_tenant(job)) {
        return;
    }
    if let Some(spec) = job.spec.as_mut() {
        for v in spec.env.values_mut() {
            *v = REDACTED.to_string();
        }
    }
}

fn redact<T>(req: &Request<T>, job: &mut v1::Job) {
    redact_for(&principal(req), job);
}
