//! `RaftService`: the transport between servers. Only a server certificate reaches it, and a
//! batch is decoded only from the member the certificate names.

use std::sync::Arc;

use tessera_core::acl::{Resource, Rpc};
use tessera_proto::v1;
use tonic::{Request, Response, Status};

use crate::context::Shared;
use crate::transport::MAX_RAFT_MESSAGE;

/// `RaftService`: the transport between servers.
pub struct RaftRpc(pub Arc<Shared>);

#[tonic::async_trait]
impl v1::raft_service_server::RaftService for RaftRpc {
    async fn send(&self, req: Request<v1::RaftBatch>) -> Result<Response<v1::RaftAck>, Status> {
        self.0.authorize(&req, Rpc::RaftSend, Resource::Server(req.get_ref().from_id))?;
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
