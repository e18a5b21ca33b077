//! Load generator for a three-server cluster on loopback: submissions acknowledged per second
//! under many concurrent clients (P1), single-client latency, and the time from a leader's
//! kill -9 to the first accepted write (P5). It starts the servers itself (release binary
//! beside it: build with `cargo build --release -p tessera -p tessera-benches`) and stops them
//! when it ends.
//!
//! `cargo run --release -p tessera-benches --bin loadgen -- --clients 256 --seconds 10 --runs 3`
//!
//! With `--agents N` it also connects N simulated agents (8 GPUs each, see `fleet.rs`) to a fresh
//! cluster: their registration rate, the leader's CPU and the heartbeat handling latency with
//! every agent at 1 Hz (P4), and how fast the servers fill every GPU with single-GPU jobs (P2).
//! `--agents 10000` is the target scale.

mod fleet;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tessera_proto::v1;
use tessera_tests::{Cluster, channel, spec, wait_for_leader};

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent clients for the throughput phase.
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Independent runs (a fresh cluster each); figures are medians over runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Leader kills per run.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Sequential submissions for the single-client latency.
    #[arg(long, default_value_t = 300)]
    single: usize,
    /// Simulated agents for the fleet phase (0: skip it); 10000 is the target scale.
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// Connections the simulated agents share.
    #[arg(long, default_value_t = 8)]
    agent_conns: usize,
    /// Seconds of steady heartbeats measured in the fleet phase.
    #[arg(long, default_value_t = 10)]
    fleet_seconds: u64,
    /// Longest wait for the fleet to fill; past it the fill rate is over what was assigned.
    #[arg(long, default_value_t = 120)]
    fill_timeout: u64,
}

/// Figures of one fleet phase.
struct FleetRun {
    register_per_sec: f64,
    leader_cores: f64,
    hb_p50_ms: f64,
    hb_p99_ms: f64,
    fill_shards_per_sec: f64,
    fill_complete: bool,
    server_peak_rss_mib: Vec<f64>,
    server_cpu_s: Vec<f64>,
}

async fn fleet_run(args: &Args, run: usize) -> anyhow::Result<FleetRun> {
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    let leader = wait_for_leader(&addrs, Duration::from_secs(20)).await.context("no leader")?;
    let leader_addr = c.servers[&leader].addr.clone();
    let leader_pid = c.servers[&leader].pid().context("leader pid")?;

    let t = Instant::now();
    let fleet = fleet::start(&leader_addr, &format!("sim{run}"), args.agents, args.agent_conns).await?;
    let register_per_sec = args.agents as f64 / t.elapsed().as_secs_f64();
    eprintln!("fleet: {} agents registered in {:.1} s", args.agents, t.elapsed().as_secs_f64());

    // Steady state: every agent heartbeats once a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, _) = fleet::cpu_and_peak_rss(leader_pid).context("leader /proc")?;
    fleet.stats.measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.fleet_seconds)).await;
    fleet.stats.measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    let (cpu1, _) = fleet::cpu_and_peak_rss(leader_pid).context("leader /proc")?;
    let leader_cores = (cpu1 - cpu0) / t.elapsed().as_secs_f64();
    let mut hb = std::mem::take(&mut *fleet.stats.heartbeat_ms.lock().await);
    hb.sort_by(f64::total_cmp);

    // Fill every GPU with single-GPU jobs, submitted by 64 clients to every server.
    let total = args.agents * 8;
    let before = fleet.stats.assigned.load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for w in 0..64 {
        let (addr, next) = (addrs[w % addrs.len()].clone(), next.clone());
        submitters.push(tokio::spawn(async move {
            let mut cl = v1::job_service_client::JobServiceClient::new(channel(&addr));
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let req =
                    v1::SubmitJobRequest { spec: Some(spec("fill")), idempotency_key: format!("r{run}-fill-{i}") };
                let _ = cl.submit_job(req).await;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(args.fill_timeout);
    let assigned = || fleet.stats.assigned.load(std::sync::atomic::Ordering::Relaxed) - before;
    while assigned() < total as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fill_shards_per_sec = assigned() as f64 / t.elapsed().as_secs_f64();
    let fill_complete = assigned() >= total as u64;
    if !fill_complete {
        eprintln!(
            "fleet: only {} of {total} shards assigned after {} s; the rate printed is over that time",
            assigned(),
            args.fill_timeout
        );
    }
    for s in submitters {
        s.abort();
    }
    let mut server_peak_rss_mib = Vec::new();
    let mut server_cpu_s = Vec::new();
    for s in c.servers.values() {
        if let Some((cpu, rss)) = s.pid().and_then(fleet::cpu_and_peak_rss) {
            server_cpu_s.push(cpu);
            server_peak_rss_mib.push(rss);
        }
    }
    drop(fleet);
    Ok(FleetRun {
        register_per_sec,
        leader_cores,
        hb_p50_ms: pct(&hb, 0.5),
        hb_p99_ms: pct(&hb, 0.99),
        fill_shards_per_sec,
        fill_complete,
        server_peak_rss_mib,
        server_cpu_s,
    })
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// (median, min, max) of figures over runs.
fn spread(v: Vec<f64>) -> (f64, f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v), min, max)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

struct Run {
    acks_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    single_p50_ms: f64,
    leader_kill_ms: Vec<f64>,
}

async fn throughput(addrs: &[String], clients: usize, seconds: u64, run: usize) -> (f64, Vec<f64>) {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addrs[c % addrs.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut client = v1::job_service_client::JobServiceClient::new(channel(&addr));
            let mut lat = Vec::new();
            let mut n = 0;
            while Instant::now() < until {
                let t = Instant::now();
                let req =
                    v1::SubmitJobRequest { spec: Some(spec("load")), idempotency_key: format!("r{run}-c{c}-{n}") };
                if client.submit_job(req).await.is_ok() {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                n += 1;
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64().max(seconds as f64);
    all.sort_by(f64::total_cmp);
    (all.len() as f64 / elapsed, all)
}

async fn one_run(args: &Args, run: usize) -> anyhow::Result<Run> {
    let mut c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, Duration::from_secs(20)).await.context("no leader")?;

    let (acks_per_sec, lat) = throughput(&addrs, args.clients, args.seconds, run).await;

    let mut client = v1::job_service_client::JobServiceClient::new(channel(&addrs[0]));
    let mut single = Vec::new();
    for n in 0..args.single {
        let t = Instant::now();
        let req = v1::SubmitJobRequest { spec: Some(spec("one")), idempotency_key: format!("r{run}-single-{n}") };
        if client.submit_job(req).await.is_ok() {
            single.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    single.sort_by(f64::total_cmp);

    let mut kills = Vec::new();
    for k in 0..args.kills {
        let leader = wait_for_leader(&c.running_addrs(), Duration::from_secs(20)).await.context("no leader")?;
        c.servers.get_mut(&leader).context("leader id")?.kill();
        let others: Vec<String> = c.running_addrs();
        let t = Instant::now();
        let mut i = 0;
        loop {
            // Short deadlines so a request stuck on the dead leader does not hide the recovery.
            let addr = &others[i % others.len()];
            i += 1;
            let mut cl = v1::job_service_client::JobServiceClient::new(channel(addr));
            let mut req = tonic::Request::new(v1::SubmitJobRequest {
                spec: Some(spec("after-kill")),
                idempotency_key: format!("r{run}-kill{k}-{i}"),
            });
            req.set_timeout(Duration::from_millis(300));
            if cl.submit_job(req).await.is_ok() {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no write accepted 30 s after the leader was killed");
            }
        }
        kills.push(t.elapsed().as_secs_f64() * 1000.0);
        c.servers.get_mut(&leader).context("leader id")?.restart();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(Run {
        acks_per_sec,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        single_p50_ms: pct(&single, 0.5),
        leader_kill_ms: kills,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runs = Vec::new();
    for r in 0..args.runs {
        let run = one_run(&args, r).await?;
        eprintln!(
            "run {r}: {:.0} acks/s (p50 {:.1} ms, p99 {:.1} ms), single client p50 {:.2} ms, leader kill -> write {:?} ms",
            run.acks_per_sec,
            run.p50_ms,
            run.p99_ms,
            run.single_p50_ms,
            run.leader_kill_ms.iter().map(|m| m.round()).collect::<Vec<_>>()
        );
        runs.push(run);
    }
    let col = |f: &dyn Fn(&Run) -> f64| spread(runs.iter().map(f).collect());
    let mut fleet_runs = Vec::new();
    if args.agents > 0 {
        for r in 0..args.runs {
            let f = fleet_run(&args, r).await?;
            eprintln!(
                "fleet run {r}: {} agents, {:.0} registrations/s, leader {:.2} cores, heartbeat p50 {:.1} ms p99 {:.1} ms, fill {:.0} shards/s, servers peak RSS {:?} MiB, CPU {:?} s",
                args.agents,
                f.register_per_sec,
                f.leader_cores,
                f.hb_p50_ms,
                f.hb_p99_ms,
                f.fill_shards_per_sec,
                f.server_peak_rss_mib.iter().map(|m| m.round()).collect::<Vec<_>>(),
                f.server_cpu_s.iter().map(|m| m.round()).collect::<Vec<_>>()
            );
            fleet_runs.push(f);
        }
    }
    let kills: Vec<f64> = runs.iter().flat_map(|r| r.leader_kill_ms.clone()).collect();
    let mut rows = vec![
        (format!("P1 submissions acknowledged/s, {} clients", args.clients), col(&|r| r.acks_per_sec)),
        ("P1 latency p50 (ms)".to_string(), col(&|r| r.p50_ms)),
        ("P1 latency p99 (ms)".to_string(), col(&|r| r.p99_ms)),
        ("P1 single client p50 (ms)".to_string(), col(&|r| r.single_p50_ms)),
        ("P5 leader kill -9 -> first accepted write (ms)".to_string(), spread(kills)),
    ];
    let fcol = |f: &dyn Fn(&FleetRun) -> f64| spread(fleet_runs.iter().map(f).collect());
    if !fleet_runs.is_empty() {
        let n = args.agents;
        rows.push((format!("agents registered/s, {n} agents"), fcol(&|f| f.register_per_sec)));
        rows.push((format!("P4 leader CPU (cores), {n} agents at 1 Hz"), fcol(&|f| f.leader_cores)));
        rows.push(("P4 heartbeat handling p50 (ms)".to_string(), fcol(&|f| f.hb_p50_ms)));
        rows.push(("P4 heartbeat handling p99 (ms)".to_string(), fcol(&|f| f.hb_p99_ms)));
        let full = if fleet_runs.iter().all(|f| f.fill_complete) { "" } else { " (NOT FULL in time)" };
        rows.push((format!("P2 shards placed/s filling {} GPUs{full}", n * 8), fcol(&|f| f.fill_shards_per_sec)));
        let max_of = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        rows.push(("server peak RSS, largest (MiB)".to_string(), fcol(&|f| max_of(&f.server_peak_rss_mib))));
        rows.push(("server CPU time, largest (s)".to_string(), fcol(&|f| max_of(&f.server_cpu_s))));
    }
    println!("{:<52} {:>10} {:>10} {:>10}", "figure", "median", "min", "max");
    for (name, (m, lo, hi)) in &rows {
        println!("{name:<52} {m:>10.1} {lo:>10.1} {hi:>10.1}");
    }
    let json: Vec<_> = rows
        .iter()
        .map(|(n, (m, lo, hi))| serde_json::json!({"figure": n, "median": m, "min": lo, "max": hi}))
        .collect();
    println!(
        "{}",
        serde_json::json!({"runs": args.runs, "clients": args.clients, "seconds": args.seconds, "figures": json})
    );
    Ok(())
}
