//! `AgentService`: one bidirectional stream per agent, served by the leader (`crate::agents`).

use std::sync::Arc;

use tessera_proto::v1;
use tonic::{Request, Response, Status};

use crate::context::{BoxStream, Shared, principal};

/// `AgentService`: one bidirectional stream per agent, served by the leader.
pub struct Agents(pub Arc<Shared>);

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for Agents {
    type SessionStream = BoxStream<v1::ServerMessage>;

    async fn session(
        &self,
        req: Request<tonic::Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = principal(&req);
        let rx = crate::agents::session(self.0.clone(), who, req.into_inner()).await?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
