//! The gRPC services of a server, one file each. Any server answers any request: writes are
//! proposed to Raft (raft-rs forwards a follower's proposal to the leader) and answered once
//! applied; reads are linearizable (ReadIndex) unless the request asks for a stale read. What
//! they share is in `crate::context`; who may call what is decided in `crate::auth`.

pub mod acl;
pub mod agent;
pub mod cluster;
pub mod jobs;
pub mod nodes;
pub mod raft;
pub mod tenants;

pub use acl::AclRpc;
pub use agent::Agents;
pub use cluster::{Cluster, crc32};
pub use jobs::Jobs;
pub use nodes::Nodes;
pub use raft::RaftRpc;
pub use tenants::Tenants;

pub use crate::context::{Page, find_node, job_id, page};
