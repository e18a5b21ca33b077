//! `ClusterService`: status, membership changes and the snapshot download (admins).

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::v1;
use tessera_raft::eraftpb::ConfChangeType;
use tonic::{Request, Response, Status};

use crate::auth::note;
use crate::context::{BoxStream, Shared, forwarded, now, unavailable};

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
            } else if let Ok(Some(remote)) = remote_status(&self.0.security, &m.address).await {
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

async fn remote_status(security: &tessera_tls::Security, addr: &str) -> Result<Option<v1::Member>, Status> {
    let ep = security
        .endpoint(addr)
        .map_err(|e| Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_millis(500));
    let Ok(ch) = security.connect(&ep).await else { return Ok(None) };
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
        let r = req.get_ref().clone();
        note(&req, format!("server {} at {}", r.id, r.address));
        if r.id == 0 || r.address.is_empty() {
            return Err(Status::invalid_argument("id and address: required"));
        }
        let s = self.0.raft.status();
        if s.role != tessera_raft::StateRole::Leader {
            return self.leader_client().await?.add_server(forwarded(r, &req)).await;
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
        let r = *req.get_ref();
        note(&req, format!("server {}", r.id));
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
            return self.leader_client().await?.remove_server(forwarded(r, &req)).await;
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

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
    }
}
