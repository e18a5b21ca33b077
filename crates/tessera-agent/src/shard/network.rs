//! The collective-communication settings a shard starts with, by cloud and instance type.
//!
//! NCCL finds the fast fabric of GPU instances only when told how: on AWS (p4d, p4de, p5, p5e,
//! p5en, p6), EFA through libfabric; on Azure ND (A100 v4, H100 v5, H200 v5), InfiniBand. The
//! agent starts shards there with the settings the clouds document. Three layers, each over
//! the one before: these defaults, then the host's own `NCCL_*`, `FI_*` and `UCX_*` variables
//! (as set for the agent, for example in its systemd unit), then the job's `env`, so a job or
//! an operator changes any of them.

use tessera_proto::v1;

/// Prefixes of the agent's own variables that pass through to shards.
pub const PASSTHROUGH_PREFIXES: [&str; 3] = ["NCCL_", "FI_", "UCX_"];

/// AWS instance families with EFA and GPUDirect RDMA.
const AWS_EFA: [&str; 6] = ["p4d", "p4de", "p5", "p5e", "p5en", "p6"];

/// The defaults for a node of `cloud` with `instance_type`.
pub fn network_defaults(cloud: v1::Cloud, instance_type: &str) -> Vec<(&'static str, &'static str)> {
    let family = instance_type.split('.').next().unwrap_or("");
    match cloud {
        v1::Cloud::Aws if AWS_EFA.contains(&family) => vec![
            ("FI_PROVIDER", "efa"),
            ("FI_EFA_USE_DEVICE_RDMA", "1"),
            ("FI_EFA_FORK_SAFE", "1"),
            ("NCCL_SOCKET_IFNAME", "^lo,docker"),
        ],
        v1::Cloud::Azure if instance_type.starts_with("Standard_ND") && instance_type.contains("96") => vec![
            ("NCCL_IB_PCI_RELAXED_ORDERING", "1"),
            ("NCCL_SOCKET_IFNAME", "eth0"),
            ("UCX_TLS", "rc"),
            ("UCX_NET_DEVICES", "eth0"),
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efa_on_aws_gpu_families_infiniband_on_azure_nd_nothing_elsewhere() {
        let aws = network_defaults(v1::Cloud::Aws, "p5.48xlarge");
        assert!(aws.contains(&("FI_PROVIDER", "efa")) && aws.contains(&("FI_EFA_USE_DEVICE_RDMA", "1")));
        assert_eq!(network_defaults(v1::Cloud::Aws, "p4d.24xlarge"), aws);
        assert!(network_defaults(v1::Cloud::Aws, "g5.xlarge").is_empty(), "no EFA there");
        assert!(network_defaults(v1::Cloud::Aws, "p3.16xlarge").is_empty());
        let azure = network_defaults(v1::Cloud::Azure, "Standard_ND96isr_H100_v5");
        assert!(azure.contains(&("NCCL_IB_PCI_RELAXED_ORDERING", "1")) && azure.contains(&("UCX_TLS", "rc")));
        assert_eq!(network_defaults(v1::Cloud::Azure, "Standard_ND96amsr_A100_v4"), azure);
        assert!(network_defaults(v1::Cloud::Azure, "Standard_NC24ads_A100_v4").is_empty());
        assert!(network_defaults(v1::Cloud::None, "p5.48xlarge").is_empty());
    }
}
