//! Fixtures shared by Tessera's benchmarks: fleets and job mixes at the scale of
//! `docs/targets.md` (10,000 nodes x 8 GPUs), built through the same commands the
//! Raft log carries.

use std::collections::BTreeMap;

use tessera_core::command::{ApplyContext, Command, Event};
use tessera_core::model::{GpuInfo, NodeInfo};
use tessera_core::spec::{Cloud, JobSpec};
use tessera_core::{State, Timestamp};

/// A state with its own log index and clock.
pub struct Fixture {
    /// The state.
    pub state: State,
    /// Last index applied.
    pub index: u64,
    /// Current time.
    pub now: Timestamp,
}

impl Fixture {
    /// Apply one command at the next index.
    pub fn apply(&mut self, cmd: Command) -> Vec<Event> {
        self.index += 1;
        self.state.apply(cmd, ApplyContext { index: self.index, now: self.now }).unwrap_or_default()
    }
    /// The context the next command will get.
    pub fn next_ctx(&self) -> ApplyContext {
        ApplyContext { index: self.index + 1, now: self.now }
    }
}

/// `nodes` 8-GPU nodes: 60% AWS in two regions, 40% Azure in two regions, three zones each,
/// a quarter of them spot, H100 and A100 models, prices varying by node.
pub fn fleet(nodes: usize) -> Fixture {
    let mut f = Fixture { state: State::new(), index: 0, now: Timestamp(1_700_000_000_000) };
    for i in 0..nodes {
        let (cloud, regions) = if i % 10 < 6 {
            (Cloud::Aws, ["us-east-1", "us-west-2"])
        } else {
            (Cloud::Azure, ["eastus", "westeurope"])
        };
        let region = regions[(i / 10) % 2];
        let zone = format!("{region}-{}", (i / 20) % 3);
        let model = if i % 3 == 0 { "NVIDIA A100-SXM4-80GB" } else { "NVIDIA H100 80GB HBM3" };
        let info = NodeInfo {
            name: format!("gpu-{i:05}"),
            cloud,
            region: region.into(),
            zone,
            instance_type: "p5.48xlarge".into(),
            spot: i % 4 == 0,
            price_micros_per_gpu_hour: 2_000_000 + (i as u64 % 7) * 250_000,
            cpu_millis: 192_000,
            memory_mib: 2_048_000,
            gpus: (0..8)
                .map(|g| GpuInfo { uuid: format!("GPU-{i:05}-{g}"), model: model.into(), memory_mib: 81_920 })
                .collect(),
            labels: BTreeMap::new(),
            agent_version: "bench".into(),
            simulated: true,
            rendezvous_ports: None,
        };
        f.apply(Command::RegisterNode { info });
    }
    f
}

/// Submit `jobs` jobs: 70% one shard x 1 GPU, 20% one shard x 8 GPUs, 10% gangs of 4 x 8 GPUs;
/// ten tenants; three priorities. Returns how many GPUs they ask for in all.
pub fn submit_mix(f: &mut Fixture, jobs: usize) -> u64 {
    let mut gpus = 0;
    for i in 0..jobs {
        let (shards, per) = match i % 10 {
            0..=6 => (1, 1),
            7 | 8 => (1, 8),
            _ => (4, 8),
        };
        let mut spec = JobSpec::new(vec!["python3".into(), "train.py".into()], shards, per);
        spec.tenant = format!("team-{}", i % 10);
        spec.priority = [250, 500, 750][i % 3];
        if i % 5 == 0 {
            spec.resources.gpu_model = Some("H100".into());
        }
        gpus += spec.total_gpus();
        f.apply(Command::SubmitJob { spec, idempotency_key: None, priority_defaulted: false, submitted_by: None });
    }
    gpus
}

/// A server's history: `jobs` jobs of the mix above, nine in ten of them cancelled (finished),
/// the rest pending, and no nodes. What a long-lived cluster holds (P6).
pub fn job_history(jobs: usize) -> Fixture {
    let mut f = Fixture { state: State::new(), index: 0, now: Timestamp(1_700_000_000_000) };
    submit_mix(&mut f, jobs);
    let ids: Vec<_> = f.state.jobs().keys().copied().collect();
    for (i, job) in ids.into_iter().enumerate() {
        if i % 10 != 0 {
            f.apply(Command::CancelJob { job, reason: Some("finished".into()) });
        }
    }
    f
}
