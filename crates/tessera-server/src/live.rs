//! The leader's live view: what agents report with every heartbeat (each attempt's step, total
//! steps and metrics; each GPU's telemetry). It changes every second on every node, so it never
//! enters the Raft log (target P4); it lives in the leader's memory, is lost on a leader change,
//! and the next heartbeats fill it again. Reads answered on followers are passed to the leader
//! so that they show it too (see `Shared::leader_for_read`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tessera_core::model::NodeId;
use tessera_proto::v1;

/// Progress kept for at most this many attempts (the newest ids win): finished attempts keep
/// their last step for `job status` until then.
const MAX_ATTEMPTS: usize = 200_000;
/// Per heartbeat: GPUs, progress entries, metrics per attempt, bytes of a metric name.
const MAX_GPUS: usize = 64;
const MAX_PROGRESS: usize = 1024;
const MAX_METRICS: usize = 64;
const MAX_METRIC_NAME: usize = 128;

#[derive(Debug, Clone, PartialEq)]
struct Progress {
    step: u64,
    total_steps: Option<u64>,
    metrics: BTreeMap<String, f64>,
    /// When this leader last saw the step change, Unix milliseconds (hang detection).
    stepped_at: u64,
}

#[derive(Default)]
struct Inner {
    progress: BTreeMap<u64, Progress>,
    nodes: HashMap<NodeId, (u64, Vec<v1::GpuTelemetry>)>,
}

/// A straggler's step is below the gang's median by more than this fraction of it...
pub const STRAGGLER_MARGIN: f64 = 0.2;
/// ...and by at least this many steps (early in a run every rank is close to 0).
pub const STRAGGLER_MIN_STEPS: u64 = 10;

/// Mark the running shards whose step lags their gang's median (see `Shard.straggler`).
pub fn mark_stragglers(shards: &mut [v1::Shard]) {
    let running = |s: &v1::Shard| s.state == v1::ShardState::Running as i32 && s.step > 0;
    let mut steps: Vec<u64> = shards.iter().filter(|s| running(s)).map(|s| s.step).collect();
    if steps.len() < 2 {
        return;
    }
    steps.sort_unstable();
    let median = steps[steps.len() / 2];
    for s in shards.iter_mut().filter(|s| running(s)) {
        let behind = median.saturating_sub(s.step);
        s.straggler = behind >= STRAGGLER_MIN_STEPS && behind as f64 > median as f64 * STRAGGLER_MARGIN;
    }
}

/// See the module documentation.
#[derive(Default)]
pub struct LiveView {
    inner: Mutex<Inner>,
}

impl LiveView {
    /// Take in one heartbeat of `node`, received at `now_ms`. Oversized parts are cut to the
    /// bounds above rather than refused: a heartbeat also proves the agent alive.
    pub fn heartbeat(&self, node: NodeId, hb: v1::Heartbeat, now_ms: u64) {
        let Ok(mut inner) = self.inner.lock() else { return };
        let mut gpus = hb.gpus;
        gpus.truncate(MAX_GPUS);
        inner.nodes.insert(node, (now_ms, gpus));
        for p in hb.progress.into_iter().take(MAX_PROGRESS) {
            let metrics = p
                .metrics
                .into_iter()
                .filter(|(k, v)| k.len() <= MAX_METRIC_NAME && v.is_finite())
                .take(MAX_METRICS)
                .collect();
            let stepped_at = match inner.progress.get(&p.attempt_id) {
                Some(old) if old.step == p.step => old.stepped_at,
                _ => now_ms,
            };
            let progress = Progress { step: p.step, total_steps: p.total_steps, metrics, stepped_at };
            inner.progress.insert(p.attempt_id, progress);
        }
        while inner.progress.len() > MAX_ATTEMPTS {
            inner.progress.pop_first();
        }
    }

    /// When this leader last saw `attempt`'s step change, Unix milliseconds; None if it has seen
    /// no progress of it.
    pub fn stepped_at(&self, attempt: u64) -> Option<u64> {
        self.inner.lock().ok()?.progress.get(&attempt).map(|p| p.stepped_at)
    }

    /// The step `attempt` last reported, if any.
    pub fn step(&self, attempt: u64) -> Option<u64> {
        self.inner.lock().ok()?.progress.get(&attempt).map(|p| p.step)
    }

    /// Forget everything (this server is no longer the leader).
    pub fn clear(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner = Inner::default();
        }
    }

    /// Fill in each shard's step, total steps and metrics from its attempt's last report.
    pub fn overlay_job(&self, job: &mut v1::Job) {
        let Ok(inner) = self.inner.lock() else { return };
        for s in &mut job.shards {
            if let Some(p) = s.attempt_id.and_then(|a| inner.progress.get(&a)) {
                s.step = p.step;
                s.total_steps = p.total_steps;
                s.metrics = p.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect();
            }
        }
        drop(inner);
        mark_stragglers(&mut job.shards);
    }

    /// Fill in each GPU's telemetry and the node's last heartbeat.
    pub fn overlay_node(&self, node: &mut v1::Node) {
        let Ok(inner) = self.inner.lock() else { return };
        let Some((at, samples)) = inner.nodes.get(&NodeId(node.id)) else { return };
        node.last_heartbeat_unix_ms = *at;
        for g in &mut node.gpus {
            if let Some(t) = samples.iter().find(|t| t.gpu_index == g.index) {
                g.telemetry = Some(t.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stragglers_lag_the_median_by_a_fifth_and_ten_steps() {
        let shard = |index: u32, state: v1::ShardState, step: u64| v1::Shard {
            index,
            state: state as i32,
            step,
            ..Default::default()
        };
        let run = v1::ShardState::Running;
        let mut gang = vec![shard(0, run, 1000), shard(1, run, 990), shard(2, run, 700), shard(3, run, 1010)];
        super::mark_stragglers(&mut gang);
        let marked: Vec<bool> = gang.iter().map(|s| s.straggler).collect();
        assert_eq!(marked, [false, false, true, false]);
        // Early on, a few steps behind is not straggling; nor is a shard that is not running.
        let mut early = vec![shard(0, run, 12), shard(1, run, 4), shard(2, v1::ShardState::Stopping, 0)];
        super::mark_stragglers(&mut early);
        assert!(early.iter().all(|s| !s.straggler));
        let mut alone = vec![shard(0, run, 100)];
        super::mark_stragglers(&mut alone);
        assert!(!alone[0].straggler);
    }

    use super::*;

    fn hb(attempt: u64, step: u64) -> v1::Heartbeat {
        v1::Heartbeat {
            gpus: vec![v1::GpuTelemetry { gpu_index: 1, utilization_percent: Some(87), ..Default::default() }],
            progress: vec![v1::AttemptProgress {
                attempt_id: attempt,
                step,
                total_steps: Some(100),
                metrics: [("loss".to_string(), 0.5), ("nan".to_string(), f64::NAN)].into_iter().collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn heartbeats_fill_in_jobs_and_nodes() {
        let live = LiveView::default();
        live.heartbeat(NodeId(3), hb(7, 42), 1234);
        let mut job = v1::Job {
            shards: vec![
                v1::Shard { attempt_id: Some(7), ..Default::default() },
                v1::Shard { attempt_id: Some(8), ..Default::default() },
            ],
            ..Default::default()
        };
        live.overlay_job(&mut job);
        assert_eq!((job.shards[0].step, job.shards[0].total_steps), (42, Some(100)));
        assert_eq!(job.shards[0].metrics.get("loss"), Some(&0.5));
        assert!(!job.shards[0].metrics.contains_key("nan"), "non-finite metrics are dropped");
        assert_eq!(job.shards[1].step, 0, "no report, nothing invented");
        let mut node = v1::Node {
            id: 3,
            gpus: vec![v1::Gpu { index: 0, ..Default::default() }, v1::Gpu { index: 1, ..Default::default() }],
            ..Default::default()
        };
        live.overlay_node(&mut node);
        assert_eq!(node.last_heartbeat_unix_ms, 1234);
        assert!(node.gpus[0].telemetry.is_none());
        assert_eq!(node.gpus[1].telemetry.as_ref().and_then(|t| t.utilization_percent), Some(87));
        live.clear();
        let mut again =
            v1::Job { shards: vec![v1::Shard { attempt_id: Some(7), ..Default::default() }], ..Default::default() };
        live.overlay_job(&mut again);
        assert_eq!(again.shards[0].step, 0);
    }

    #[test]
    fn the_oldest_attempts_are_forgotten_first() {
        let live = LiveView::default();
        for a in 0..(MAX_ATTEMPTS as u64 + 10) {
            live.heartbeat(NodeId(1), v1::Heartbeat { progress: hb(a, 1).progress, ..Default::default() }, 0);
        }
        let inner = live.inner.lock().unwrap();
        assert_eq!(inner.progress.len(), MAX_ATTEMPTS);
        assert_eq!(inner.progress.keys().next(), Some(&10));
    }
}
