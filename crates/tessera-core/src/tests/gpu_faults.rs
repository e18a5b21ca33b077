//! XID classes and a faulty GPU's way back ([`crate::xid`]).

use super::*;
use crate::model::GpuHealth;
use crate::xid::{COOL_DOWN_MS, FAULT_WINDOW_MS, XidClass, classify};

fn report(node: NodeId, gpu: u32, xid: u32) -> Command {
    Command::SetGpuHealth { node, gpu, healthy: false, reason: format!("XID {xid}"), xid: Some(xid), cool_down: false }
}

fn cool_down_ended(node: NodeId, gpu: u32) -> Command {
    Command::SetGpuHealth { node, gpu, healthy: true, reason: "cool-down ended".into(), xid: None, cool_down: true }
}

fn health(sim: &Sim, node: NodeId, gpu: u32) -> GpuHealth {
    sim.state.node(node).unwrap().gpus[gpu as usize].health.clone()
}

#[test]
fn application_xids_leave_the_gpu_in_service_and_hardware_ones_bench_it() {
    for x in [13, 31, 43, 45] {
        assert_eq!(classify(x), XidClass::Application, "XID {x}");
    }
    for x in [48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 999] {
        assert_eq!(classify(x), XidClass::Hardware, "XID {x}");
    }
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    let j = sim.submit(spec(1, 8));
    sim.round();
    sim.start_all(j);
    // The program's fault: the GPU and the shard are left alone (the process fails by itself).
    let ev = sim.apply(report(a, 2, 31)).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(health(&sim, a, 2), GpuHealth::Healthy);
    assert_eq!(sim.shard_state(j, 0), ShardState::Running);
    // A hardware fault: benched for the cool-down, and its shard stopped to move.
    sim.apply(report(a, 2, 79)).unwrap();
    let until = Some(Timestamp(sim.now + COOL_DOWN_MS));
    assert_eq!(health(&sim, a, 2), GpuHealth::Unhealthy { reason: "XID 79".into(), since: Timestamp(sim.now), until });
    assert_eq!(sim.shard_state(j, 0), ShardState::Stopping(StopReason::GpuFault));
}

#[test]
fn a_benched_gpu_comes_back_after_its_cool_down_unless_it_faulted_three_times_in_a_day() {
    let mut sim = Sim::new();
    let a = sim.node(n("a"));
    sim.apply(report(a, 0, 79)).unwrap();
    // Too early: the leader's command changes nothing.
    sim.now += COOL_DOWN_MS - 1;
    sim.apply(cool_down_ended(a, 0)).unwrap();
    assert!(matches!(health(&sim, a, 0), GpuHealth::Unhealthy { .. }));
    sim.now += 1;
    sim.apply(cool_down_ended(a, 0)).unwrap();
    assert_eq!(health(&sim, a, 0), GpuHealth::Healthy);
    assert_eq!(sim.state.node(a).unwrap().gpus[0].faults.len(), 1, "the fault is remembered");

    // A second fault, later that day: benched again, back again.
    sim.now += 3_600_000;
    sim.apply(report(a, 0, 48)).unwrap();
    sim.now += COOL_DOWN_MS;
    sim.apply(cool_down_ended(a, 0)).unwrap();
    assert_eq!(health(&sim, a, 0), GpuHealth::Healthy);
    // A third within 24 hours retires it: no cool-down ends it, only an operator.
    sim.now += 3_600_000;
    sim.apply(report(a, 0, 94)).unwrap();
    assert!(matches!(health(&sim, a, 0), GpuHealth::Unhealthy { until: None, .. }), "{:?}", health(&sim, a, 0));
    sim.now += FAULT_WINDOW_MS;
    sim.apply(cool_down_ended(a, 0)).unwrap();
    assert!(matches!(health(&sim, a, 0), GpuHealth::Unhealthy { until: None, .. }));
    let out = plan(&sim.state, Timestamp(sim.now), &PlanLimits::default());
    assert!(out.plan.placements.is_empty());
    let j = sim.submit(spec(1, 8));
    sim.round();
    assert_eq!(sim.shard_state(j, 0), ShardState::Pending, "seven healthy GPUs do not hold eight");
    // The operator clears it: healthy, its faults forgotten.
    sim.apply(Command::SetGpuHealth {
        node: a,
        gpu: 0,
        healthy: true,
        reason: "reset by hand".into(),
        xid: None,
        cool_down: false,
    })
    .unwrap();
    assert_eq!(health(&sim, a, 0), GpuHealth::Healthy);
    assert!(sim.state.node(a).unwrap().gpus[0].faults.is_empty());
    sim.round();
    assert_eq!(sim.shard_state(j, 0), ShardState::Assigned);

    // Faults older than the window do not count.
    let mut sim = Sim::new();
    let b = sim.node(n("b"));
    for _ in 0..5 {
        sim.apply(report(b, 1, 79)).unwrap();
        sim.now += FAULT_WINDOW_MS / 2 + 1;
        sim.apply(cool_down_ended(b, 1)).unwrap();
        assert_eq!(health(&sim, b, 1), GpuHealth::Healthy);
    }
    assert!(sim.state.node(b).unwrap().gpus[1].faults.len() <= 2);
    sim.state.check_invariants().unwrap();
    // The history survives a snapshot.
    let restored = State::restore(&sim.state.snapshot()).unwrap();
    assert_eq!(restored.node(b).unwrap().gpus[1].faults, sim.state.node(b).unwrap().gpus[1].faults);
}
