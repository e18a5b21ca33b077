//! Planning and applying at fleet scale: 10,000 nodes x 8 GPUs with thousands of pending jobs.
//!
//! Run: `cargo bench -p tessera-benches --bench core`. Figures go in the closing note and in
//! docs/performance.md once that exists.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tessera_benches::{fleet, submit_mix};
use tessera_core::command::Command;
use tessera_core::planner::{PlanLimits, plan};

const NODES: usize = 10_000;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.sample_size(10).measurement_time(Duration::from_secs(20));

    // An empty fleet and 5,000 pending jobs (about 12,000 shards, 26,000 GPUs).
    let mut empty = fleet(NODES);
    submit_mix(&mut empty, 5_000);
    let limits = PlanLimits::default();
    let first = plan(&empty.state, empty.now, &limits);
    eprintln!("empty fleet: plan places {} shards of {} jobs", first.plan.shard_count(), first.plan.placements.len());
    g.bench_function("plan/10k-nodes/5k-pending/empty-fleet", |b| {
        b.iter(|| black_box(plan(&empty.state, empty.now, &limits)))
    });
    g.bench_function("apply/10k-nodes/5k-pending/empty-fleet", |b| {
        b.iter_batched(
            || (empty.state.clone(), Command::ApplyPlan { plan: first.plan.clone() }),
            |(mut state, cmd)| black_box(state.apply(cmd, empty.next_ctx())),
            BatchSize::LargeInput,
        )
    });

    // The same fleet almost full, with 5,000 more jobs waiting: the blocked-queue case
    // (reservation and preemption searches).
    let mut full = fleet(NODES);
    submit_mix(&mut full, 30_000);
    loop {
        let out = plan(&full.state, full.now, &limits);
        if out.plan.is_empty() {
            break;
        }
        full.apply(Command::ApplyPlan { plan: out.plan });
    }
    let pending = full.state.pending_jobs().len();
    let held: usize = full.state.live_attempts().len();
    eprintln!("full fleet: {held} live attempts, {pending} jobs pending");
    g.bench_function("plan/10k-nodes/full-fleet/pending-queue", |b| {
        b.iter(|| black_box(plan(&full.state, full.now, &limits)))
    });

    // What the Raft thread pays to hand the state to the snapshot thread (jobs and nodes
    // shared), and the deep copy of every job and node it took before they were shared.
    g.bench_function("copy/10k-nodes/full-fleet/for-snapshot", |b| b.iter(|| black_box(full.state.snapshot_copy())));
    g.bench_function("copy/10k-nodes/full-fleet/deep-jobs-and-nodes", |b| {
        b.iter(|| {
            let jobs: Vec<_> = full.state.jobs().values().map(|j| (**j).clone()).collect();
            let nodes: Vec<_> = full.state.nodes().values().map(|n| (**n).clone()).collect();
            black_box((jobs, nodes))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
