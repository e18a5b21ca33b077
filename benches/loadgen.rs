//! Load generator for a three-server cluster on loopback: submissions acknowledged per second
//! under many concurrent clients (P1), single-client latency, and the time from a leader's
//! kill -9 to the first accepted write (P5). It starts the servers itself (release binary
//! beside it: build with `cargo build --release -p tessera -p tessera-benches`) and stops them
//! when it ends.
//!
//! `cargo run --release -p tessera-benches --bin loadgen -- --clients 256 --seconds 10 --runs 3`

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
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
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
    let col = |f: &dyn Fn(&Run) -> f64| -> (f64, f64, f64) {
        let v: Vec<f64> = runs.iter().map(f).collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(v), min, max)
    };
    let kills: Vec<f64> = runs.iter().flat_map(|r| r.leader_kill_ms.clone()).collect();
    let kmin = kills.iter().copied().fold(f64::INFINITY, f64::min);
    let kmax = kills.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let rows = [
        (format!("P1 submissions acknowledged/s, {} clients", args.clients), col(&|r| r.acks_per_sec)),
        ("P1 latency p50 (ms)".to_string(), col(&|r| r.p50_ms)),
        ("P1 latency p99 (ms)".to_string(), col(&|r| r.p99_ms)),
        ("P1 single client p50 (ms)".to_string(), col(&|r| r.single_p50_ms)),
        ("P5 leader kill -9 -> first accepted write (ms)".to_string(), (median(kills.clone()), kmin, kmax)),
    ];
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
