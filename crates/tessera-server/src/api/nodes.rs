//! `NodeService`: list and inspect nodes; drain, undrain and clear GPU health (operators).

use std::sync::Arc;

use tessera_core::command::Command;
use tessera_core::model::{DrainReason, NodeId};
use tessera_proto::convert::node_to_proto;
use tessera_proto::v1;
use tonic::{Request, Response, Status};

use crate::auth::note;
use crate::context::{Shared, find_node, forwarded, leader_unreachable, now};

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
            match v1::node_service_client::NodeServiceClient::new(ch)
                .list_nodes(forwarded(req.get_ref().clone(), &req))
                .await
            {
                Err(s) if leader_unreachable(&s) => {}
                other => return other,
            }
        }
        let req = req.into_inner();
        let crate::context::Page { size: page_size, first } = crate::context::page(req.page_size, &req.page_token)?;
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
            match v1::node_service_client::NodeServiceClient::new(ch)
                .get_node(forwarded(req.get_ref().clone(), &req))
                .await
            {
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
        note(&req, node_label(&req.get_ref().node));
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
        note(&req, node_label(&req.get_ref().node));
        let node = self.node_write(req.into_inner().node, |node| Command::UndrainNode { node }).await?;
        Ok(Response::new(v1::UndrainNodeResponse { node: Some(node) }))
    }

    async fn clear_gpu_health(
        &self,
        req: Request<v1::ClearGpuHealthRequest>,
    ) -> Result<Response<v1::ClearGpuHealthResponse>, Status> {
        note(&req, node_label(&req.get_ref().node));
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
            let cmd = Command::SetGpuHealth {
                node: id,
                gpu,
                healthy: true,
                reason: reason.clone(),
                xid: None,
                cool_down: false,
            };
            self.0.write(&cmd).await?;
        }
        let node = self.0.read(0, move |s| s.node(id).map(|n| node_to_proto(n, s))).await?;
        Ok(Response::new(v1::ClearGpuHealthResponse { node }))
    }
}

/// How the audit log names the node a request names.
fn node_label(r: &Option<v1::NodeRef>) -> String {
    match r.as_ref().and_then(|r| r.node.as_ref()) {
        Some(v1::node_ref::Node::Id(id)) => format!("node {id}"),
        Some(v1::node_ref::Node::Name(n)) => format!("node {n}"),
        None => "node (none)".into(),
    }
}
