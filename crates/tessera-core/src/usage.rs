//! Usage and cost: GPU-hours and money over a time range, grouped by tenant, user, cloud,
//! region, instance type, node or job (`tessera usage`).
//!
//! Counted from each job's timeline ([`crate::timeline`]): an attempt holds its GPUs from its
//! placement (`Placed`) to its end (`Exited`, or `NodeLost`); one still live counts up to
//! `until`. The GPUs are the job's GPUs per shard; the money is the GPU-hours times the
//! attempt's node's price per GPU-hour (as the node last registered it). The timeline keeps
//! every placement and end (it drops checkpoints first), so nothing is missed unless a job made
//! more than about 240 attempts; an attempt whose end was dropped ends at the shard's next
//! placement, or at the job's end.
//!
//! Pure: the range and `until` come in as arguments.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{AttemptId, Job, JobEventKind, NodeId, Timestamp};
use crate::state::State;

/// What usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UsageKey {
    /// The job's tenant.
    Tenant,
    /// Who submitted the job ("user/alice", "token/ci"; "-" if not recorded).
    User,
    /// The node's cloud.
    Cloud,
    /// The node's region.
    Region,
    /// The node's instance type.
    InstanceType,
    /// The node's name.
    Node,
    /// The job ("job-12").
    Job,
}

impl UsageKey {
    /// Every key, in the order their names are listed.
    pub const ALL: [UsageKey; 7] = [
        UsageKey::Tenant,
        UsageKey::User,
        UsageKey::Cloud,
        UsageKey::Region,
        UsageKey::InstanceType,
        UsageKey::Node,
        UsageKey::Job,
    ];

    /// Its name, as users write it: "tenant", "instance-type".
    pub fn name(self) -> &'static str {
        match self {
            UsageKey::Tenant => "tenant",
            UsageKey::User => "user",
            UsageKey::Cloud => "cloud",
            UsageKey::Region => "region",
            UsageKey::InstanceType => "instance-type",
            UsageKey::Node => "node",
            UsageKey::Job => "job",
        }
    }

    /// The key of this name ("instance_type" is accepted for "instance-type").
    pub fn parse(s: &str) -> Option<UsageKey> {
        let s = s.trim().replace('_', "-");
        UsageKey::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// One group's usage.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    /// The group's values, one per key asked for, in that order.
    pub keys: Vec<String>,
    /// GPU-hours used in the range.
    pub gpu_hours: f64,
    /// What they cost, in millionths of the price's currency.
    pub cost_micros: u64,
    /// Attempts that held GPUs in the range.
    pub attempts: u64,
    /// Distinct jobs among them.
    pub jobs: u64,
}

/// The question.
#[derive(Debug, Clone)]
pub struct UsageQuery<'a> {
    /// Start of the range.
    pub since: Timestamp,
    /// End of the range, and "now" for attempts still live.
    pub until: Timestamp,
    /// Group by these, in this order; none: one row for everything.
    pub by: &'a [UsageKey],
    /// Only these tenants' jobs; None: every tenant.
    pub tenants: Option<&'a BTreeSet<String>>,
}

const MS_PER_HOUR: u128 = 3_600_000;

#[derive(Default)]
struct Acc {
    gpu_ms: u128,
    /// GPU-milliseconds times micros per GPU-hour.
    cost: u128,
    attempts: u64,
    jobs: BTreeSet<u64>,
}

/// The usage in `[since, until)`, one row per group with any use, ordered by the groups' values.
pub fn usage(state: &State, q: &UsageQuery<'_>) -> Vec<UsageRow> {
    let mut groups: BTreeMap<Vec<String>, Acc> = BTreeMap::new();
    if q.until <= q.since {
        return Vec::new();
    }
    for job in state.jobs().values() {
        if q.tenants.is_some_and(|t| !t.contains(&job.spec.tenant))
            || job.submitted_at >= q.until
            || job.finished_at.is_some_and(|f| f < q.since)
        {
            continue;
        }
        for held in holdings(job, q.until) {
            let from = held.from.max(q.since);
            let to = held.to.min(q.until);
            if to <= from {
                continue;
            }
            let gpu_ms = u128::from(to.since(from)) * u128::from(job.spec.resources.gpus);
            let node = state.node(held.node);
            let keys = q.by.iter().map(|k| key_value(*k, job, held.node, node)).collect();
            let acc = groups.entry(keys).or_default();
            acc.gpu_ms += gpu_ms;
            acc.cost += gpu_ms * u128::from(node.map_or(0, |n| n.info.price_micros_per_gpu_hour));
            acc.attempts += 1;
            acc.jobs.insert(job.id.0);
        }
    }
    groups
        .into_iter()
        .map(|(keys, a)| UsageRow {
            keys,
            gpu_hours: a.gpu_ms as f64 / MS_PER_HOUR as f64,
            cost_micros: u64::try_from(a.cost / MS_PER_HOUR).unwrap_or(u64::MAX),
            attempts: a.attempts,
            jobs: a.jobs.len() as u64,
        })
        .collect()
}

fn key_value(k: UsageKey, job: &Job, node_id: NodeId, node: Option<&crate::model::Node>) -> String {
    let node_or = |f: &dyn Fn(&crate::model::Node) -> String| node.map_or_else(|| "-".to_string(), f);
    match k {
        UsageKey::Tenant => job.spec.tenant.clone(),
        UsageKey::User => job.submitted_by.clone().unwrap_or_else(|| "-".into()),
        UsageKey::Cloud => node_or(&|n| n.info.cloud.to_string()),
        UsageKey::Region => node_or(&|n| n.info.region.clone()),
        UsageKey::InstanceType => node_or(&|n| n.info.instance_type.clone()),
        UsageKey::Node => node.map_or_else(|| node_id.to_string(), |n| n.info.name.clone()),
        UsageKey::Job => job.id.to_string(),
    }
}

/// One attempt's hold on its GPUs.
struct Held {
    node: NodeId,
    from: Timestamp,
    to: Timestamp,
}

/// The job's attempts and when each held its GPUs; one still live holds them up to `until`.
fn holdings(job: &Job, until: Timestamp) -> Vec<Held> {
    let mut open: BTreeMap<u32, (AttemptId, NodeId, Timestamp)> = BTreeMap::new();
    let mut out = Vec::new();
    for e in &job.events {
        match (e.kind, e.attempt, e.node) {
            (JobEventKind::Placed { .. }, Some(a), Some(n)) => {
                // A placement whose predecessor's end was dropped: that one ended by now.
                if let Some((_, node, from)) = open.insert(e.shard, (a, n, e.at)) {
                    out.push(Held { node, from, to: e.at });
                }
            }
            (JobEventKind::Exited { .. } | JobEventKind::NodeLost, Some(a), _) => {
                if open.get(&e.shard).is_some_and(|(held, ..)| *held == a)
                    && let Some((_, node, from)) = open.remove(&e.shard)
                {
                    out.push(Held { node, from, to: e.at });
                }
            }
            _ => {}
        }
    }
    // Still open: live attempts hold their GPUs now; an attempt of a finished job whose end
    // was dropped ended with the job.
    for (shard, (a, node, from)) in open {
        let live = job
            .shards
            .get(shard as usize)
            .is_some_and(|s| s.state.is_live() && s.attempt.as_ref().is_some_and(|at| at.id == a));
        let to = if live { until } else { job.finished_at.unwrap_or(until) };
        out.push(Held { node, from, to });
    }
    out
}
