//! What a plan is, and the constraints that both the planner and apply check: plans are made by
//! [`crate::planner`] and applied (each placement checked again) by [`crate::state`]. Both
//! depend on this module, and it on neither.

use serde::{Deserialize, Serialize};

use crate::model::{JobId, Node, NodeId, NodeInfo};
use crate::spec::{JobSpec, SpotPolicy};

/// One shard's planned placement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardPlacement {
    /// Shard index.
    pub shard: u32,
    /// Node.
    pub node: NodeId,
    /// GPU indices on the node.
    pub gpus: Vec<u32>,
}

/// All pending shards of one job, placed together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GangPlacement {
    /// Job.
    pub job: JobId,
    /// Its pending shards.
    pub shards: Vec<ShardPlacement>,
}

/// Stop these lower-priority jobs so that `job` can run once their GPUs are free.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Preemption {
    /// The job that needs room.
    pub job: JobId,
    /// Jobs to stop and requeue.
    pub victims: Vec<JobId>,
}

/// A plan: applied as one command.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Gangs to place.
    pub placements: Vec<GangPlacement>,
    /// Preemptions to start.
    pub preemptions: Vec<Preemption>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty() && self.preemptions.is_empty()
    }
    /// Shards placed by this plan.
    pub fn shard_count(&self) -> usize {
        self.placements.iter().map(|g| g.shards.len()).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Constraints shared by the planner and apply
// ---------------------------------------------------------------------------------------------

/// Does the node (ignoring its GPUs and state) meet the job's cloud, region, label and spot
/// constraints?
pub fn node_admits(spec: &JobSpec, node: &Node) -> bool {
    info_admits(spec, &node.info)
}

pub(crate) fn info_admits(spec: &JobSpec, info: &NodeInfo) -> bool {
    let p = &spec.placement;
    (p.clouds.is_empty() || p.clouds.contains(&info.cloud))
        && (p.regions.is_empty() || p.regions.contains(&info.region))
        && p.labels.iter().all(|(k, v)| info.labels.get(k) == Some(v))
        && match p.spot {
            SpotPolicy::Avoid => !info.spot,
            SpotPolicy::Require => info.spot,
            SpotPolicy::Allow | SpotPolicy::Prefer => true,
        }
}

/// Does a set of nodes stay within one cloud and region, as far as the spec requires?
pub fn span_ok<'a>(spec: &JobSpec, mut infos: impl Iterator<Item = &'a NodeInfo>) -> bool {
    let Some(first) = infos.next() else { return true };
    let p = &spec.placement;
    infos.all(|i| p.span_clouds || (i.cloud == first.cloud && (p.span_regions || i.region == first.region)))
}
