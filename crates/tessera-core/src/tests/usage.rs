//! GPU-hours and cost from the jobs' timelines ([`crate::usage`]).

use std::collections::BTreeSet;

use super::*;
use crate::usage::{UsageKey, UsageQuery, UsageRow, usage};

const MIN: u64 = 60_000;

fn rows(sim: &Sim, since: u64, by: &[UsageKey], tenants: Option<&BTreeSet<String>>) -> Vec<UsageRow> {
    usage(&sim.state, &UsageQuery { since: Timestamp(since), until: Timestamp(sim.now), by, tenants })
}

fn keyed(rows: &[UsageRow]) -> Vec<(Vec<&str>, f64, u64, u64, u64)> {
    rows.iter()
        .map(|r| (r.keys.iter().map(String::as_str).collect(), r.gpu_hours, r.cost_micros, r.attempts, r.jobs))
        .collect()
}

#[test]
fn usage_counts_each_attempt_from_placement_to_end_at_its_node_s_price() {
    let mut sim = Sim::new();
    let t0 = sim.now;
    // An AWS node at $4 per GPU-hour, an Azure node at $3.
    let aws = sim.node(NodeSpec { price: 4_000_000, ..n("aws-a") });
    let aws_b = sim.node(NodeSpec { price: 4_000_000, ..n("aws-b") });
    let azure =
        sim.node(NodeSpec { cloud: Cloud::Azure, region: "eastus", zone: "eastus-1", price: 3_000_000, ..n("az-a") });
    sim.apply(tenant_cmd("ml", 1, None)).unwrap();
    sim.apply(tenant_cmd("vision", 1, None)).unwrap();

    // ml: one job of 8 GPUs on AWS for an hour.
    let mut s = spec(1, 8);
    s.tenant = "ml".into();
    s.placement.clouds = vec![Cloud::Aws];
    let ml = sim.submit(s);
    sim.round();
    assert_eq!(sim.nodes_of(ml), vec![aws]);
    sim.start_all(ml);

    // vision: 2 GPUs on Azure for 30 minutes, then its node is lost; placed again on AWS.
    let mut s = spec(1, 2);
    s.tenant = "vision".into();
    s.placement.clouds = vec![Cloud::Azure, Cloud::Aws];
    let vision = sim.submit(s);
    sim.round();
    assert_eq!(sim.nodes_of(vision), vec![azure]);
    sim.now += 30 * MIN;
    sim.apply(Command::MarkNodeDown { node: azure, reason: "gone".into(), registration: None }).unwrap();
    sim.round();
    assert_eq!(sim.nodes_of(vision), vec![aws_b]);
    sim.now += 30 * MIN;
    sim.exit(ml, 0, 0).unwrap();
    // vision runs on for 15 more minutes, and is still running at the end of the range.
    sim.now += 15 * MIN;

    let by = [UsageKey::Tenant, UsageKey::Cloud];
    assert_eq!(
        keyed(&rows(&sim, t0, &by, None)),
        vec![
            (vec!["ml", "aws"], 8.0, 32_000_000, 1, 1),
            (vec!["vision", "aws"], 1.5, 6_000_000, 1, 1),
            (vec!["vision", "azure"], 1.0, 3_000_000, 1, 1),
        ]
    );
    // One row for everything; and a range that starts half way through ml's hour.
    assert_eq!(keyed(&rows(&sim, t0, &[], None)), vec![(vec![], 10.5, 41_000_000, 3, 2)]);
    let late = rows(&sim, t0 + 30 * MIN, &[UsageKey::Tenant], None);
    assert_eq!(keyed(&late), vec![(vec!["ml"], 4.0, 16_000_000, 1, 1), (vec!["vision"], 1.5, 6_000_000, 1, 1)]);
    // Only some tenants; other keys.
    let only = BTreeSet::from(["vision".to_string()]);
    let v = rows(&sim, t0, &[UsageKey::Node, UsageKey::InstanceType, UsageKey::Region, UsageKey::Job], Some(&only));
    assert_eq!(
        keyed(&v),
        vec![
            (vec!["aws-b", "p5.48xlarge", "us-east-1", "job-2"], 1.5, 6_000_000, 1, 1),
            (vec!["az-a", "p5.48xlarge", "eastus", "job-2"], 1.0, 3_000_000, 1, 1),
        ]
    );
    assert_eq!(keyed(&rows(&sim, t0, &[UsageKey::User], Some(&only))), vec![(vec!["-"], 2.5, 9_000_000, 2, 1)]);
    // A range before anything ran, or an empty one, has no rows.
    assert!(
        usage(
            &sim.state,
            &UsageQuery { since: Timestamp(t0 - 10 * MIN), until: Timestamp(t0), by: &by, tenants: None }
        )
        .is_empty()
    );
    assert!(
        usage(&sim.state, &UsageQuery { since: Timestamp(sim.now), until: Timestamp(t0), by: &by, tenants: None })
            .is_empty()
    );
}

#[test]
fn usage_keys_parse_by_name() {
    assert_eq!(UsageKey::parse("instance-type"), Some(UsageKey::InstanceType));
    assert_eq!(UsageKey::parse("instance_type"), Some(UsageKey::InstanceType));
    assert_eq!(UsageKey::parse(" tenant "), Some(UsageKey::Tenant));
    assert_eq!(UsageKey::parse("gpu"), None);
    for k in UsageKey::ALL {
        assert_eq!(UsageKey::parse(k.name()), Some(k));
    }
}

#[test]
fn usage_counts_every_attempt_of_a_job_whose_history_overflowed() {
    let mut sim = Sim::new();
    let t0 = sim.now;
    sim.node(NodeSpec { price: 2_000_000, ..n("a") });
    let mut s = spec(1, 4);
    s.retry.max_attempts = 100;
    s.retry.backoff_secs = 0;
    let j = sim.submit(s);
    // 90 attempts of one minute each, every one failing: 4 events each, 360 in all.
    for _ in 0..90 {
        sim.round();
        sim.start_all(j);
        sim.now += MIN;
        sim.exit(j, 0, 1).unwrap();
    }
    let job = sim.state.job(j).unwrap();
    assert!(crate::timeline::dropped(job) > 0, "the history overflowed");
    let placed = job.events.iter().filter(|e| matches!(e.kind, crate::model::JobEventKind::Placed { .. })).count();
    let exited = job.events.iter().filter(|e| matches!(e.kind, crate::model::JobEventKind::Exited { .. })).count();
    assert_eq!((placed, exited), (90, 90), "placements and ends are kept over starts and requeues");
    // 90 minutes on 4 GPUs at $2: 6 GPU-hours, $12.
    assert_eq!(keyed(&rows(&sim, t0, &[], None)), vec![(vec![], 6.0, 12_000_000, 90, 1)]);
}
