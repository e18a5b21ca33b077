//! The small cluster the request targets run against: three nodes (AWS on demand, AWS spot
//! draining after a notice, Azure), a running two-shard gang with a checkpoint, a job that
//! finished, a job waiting for GPUs nobody has, and a tenant with a quota. Built through
//! `State::apply` from the same commands the log carries, once per process.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use tessera_core::command::{ApplyContext, Command, ExitStatus};
use tessera_core::model::{DrainReason, GpuInfo, NodeInfo};
use tessera_core::planner::{PlanLimits, plan};
use tessera_core::spec::{Cloud, JobSpec};
use tessera_core::{AttemptId, JobId, NodeId, State, Timestamp};

/// The time the fixture was built at, in Unix milliseconds; requests run a minute later.
pub const T0: u64 = 1_790_000_000_000;
/// The time the targets apply commands at.
pub const NOW: Timestamp = Timestamp(T0 + 60_000);

/// The fixture state: see the module documentation. Any command applied to a clone of it must
/// leave a state that passes `check_invariants` (checked after every apply in debug builds).
pub fn fixture() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(build)
}

/// A registration as an agent would send it.
pub fn node_info(name: &str, cloud: Cloud, gpus: u32, model: &str, spot: bool) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        cloud,
        region: if cloud == Cloud::Azure { "eastus".into() } else { "us-east-1".into() },
        zone: if cloud == Cloud::Azure { "eastus-1".into() } else { "us-east-1a".into() },
        instance_type: if cloud == Cloud::Azure { "Standard_ND96isr_H100_v5".into() } else { "p5.48xlarge".into() },
        spot,
        price_micros_per_gpu_hour: if spot { 1_500_000 } else { 4_000_000 },
        cpu_millis: 192_000,
        memory_mib: 2_000_000,
        gpus: (0..gpus)
            .map(|i| GpuInfo { uuid: format!("GPU-{name}-{i}"), model: model.into(), memory_mib: 80 * 1024 })
            .collect(),
        labels: BTreeMap::from([("fabric".to_string(), "efa".to_string())]),
        agent_version: "0.1.0".into(),
        simulated: true,
        rendezvous_ports: None,
    }
}

fn build() -> State {
    let mut state = State::new();
    let mut index = 0;
    let mut apply = |state: &mut State, cmd: Command, at: u64| {
        index += 1;
        // A fixture that does not build is a bug in this file, not a finding.
        state.apply(cmd, ApplyContext { index, now: Timestamp(T0 + at) }).expect("fixture command applies")
    };
    for info in [
        node_info("aws-1", Cloud::Aws, 4, "NVIDIA H100 80GB HBM3", false),
        node_info("aws-spot-1", Cloud::Aws, 4, "NVIDIA H100 80GB HBM3", true),
        node_info("azure-1", Cloud::Azure, 4, "NVIDIA A100-SXM4-80GB", false),
    ] {
        apply(&mut state, Command::RegisterNode { info }, 0);
    }
    apply(
        &mut state,
        Command::SetTenant {
            name: "nlp".into(),
            weight: 2,
            gpu_quota: Some(64),
            max_priority: Some(900),
            default_priority: None,
            gpu_hours_quota: Some(1000.0),
            cloud_gpu_hours_quota: [("aws".to_string(), 500.0)].into(),
            gpu_hours_window_ms: tessera_core::model::DEFAULT_GPU_HOURS_WINDOW_MS,
            mode: Default::default(),
        },
        1,
    );
    let mut gang = JobSpec::new(vec!["python3".into(), "train.py".into()], 2, 2);
    gang.tenant = "nlp".into();
    gang.checkpoint_dir = Some("s3://ckpt/gang".into());
    apply(
        &mut state,
        Command::SubmitJob {
            spec: gang,
            idempotency_key: Some("gang-1".into()),
            priority_defaulted: false,
            submitted_by: None,
        },
        2,
    );
    apply(
        &mut state,
        Command::SubmitJob {
            spec: JobSpec::new(vec!["true".into()], 1, 1),
            idempotency_key: None,
            priority_defaulted: false,
            submitted_by: None,
        },
        3,
    );
    let placed = plan(&state, Timestamp(T0 + 4), &PlanLimits::default()).plan;
    apply(&mut state, Command::ApplyPlan { plan: placed }, 4);
    let live: Vec<(AttemptId, JobId)> = state.live_attempts().iter().map(|(a, r)| (*a, r.job)).collect();
    for (attempt, _) in &live {
        apply(&mut state, Command::ShardStarted { attempt: *attempt }, 5);
    }
    for (attempt, job) in &live {
        if *job == JobId(1) {
            let uri = format!("s3://ckpt/gang/step-100-{}", attempt.0);
            apply(&mut state, Command::RecordCheckpoint { attempt: *attempt, step: 100, uri }, 6);
        } else {
            let exit = ExitStatus { code: Some(0), signal: None };
            let cmd = Command::ShardExited { attempt: *attempt, exit, node_fault: false, message: None };
            apply(&mut state, cmd, 7);
        }
    }
    // Waits for GPUs no node has.
    apply(
        &mut state,
        Command::SubmitJob {
            spec: JobSpec::new(vec!["big".into()], 4, 64),
            idempotency_key: None,
            priority_defaulted: false,
            submitted_by: None,
        },
        8,
    );
    if let Some(spot) = state.node_by_name("aws-spot-1").map(|n| n.id) {
        let deadline = Some(Timestamp(T0 + 120_000));
        apply(&mut state, Command::DrainNode { node: spot, reason: DrainReason::SpotInterruption, deadline }, 9);
    }
    // A job array (its record and its first elements) and a job waiting on the big one.
    let mut array = JobSpec::new(vec!["sweep.py".into()], 1, 1);
    array.array = tessera_core::spec::ArraySpec::parse("0-9%3").ok();
    apply(
        &mut state,
        Command::SubmitJob { spec: array, idempotency_key: None, priority_defaulted: false, submitted_by: None },
        10,
    );
    let mut after = JobSpec::new(vec!["report.py".into()], 1, 1);
    after.after_ok = vec![3];
    apply(
        &mut state,
        Command::SubmitJob { spec: after, idempotency_key: None, priority_defaulted: false, submitted_by: None },
        11,
    );
    state
}

/// A node of the fixture, by name.
pub fn node(name: &str) -> NodeId {
    fixture().node_by_name(name).map_or(NodeId(1), |n| n.id)
}

/// The live attempts of the fixture, in id order.
pub fn live_attempts() -> Vec<AttemptId> {
    fixture().live_attempts().keys().copied().collect()
}
