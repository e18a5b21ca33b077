//! Load generator: the figures P1-P7 of `docs/targets.md`, measured on real
//! `tessera server` and `tessera agent` processes on loopback. It starts everything itself (the
//! release binary beside it: build with `cargo build --release -p tessera -p tessera-benches`)
//! and stops it when it ends.
//!
//! ```text
//! ./target/release/loadgen            # quick: 500 agents, 64 clients, one run (about a minute)
//! ./target/release/loadgen --full     # target scale: 10,000 agents, 256 clients, 3 runs
//! ```
//!
//! Every scale, count and duration is also a flag of its own. Three phases, each on fresh
//! clusters of three servers, once per run:
//!
//! 1. cluster: submissions from many concurrent clients (P1), one client's latency (P1), the
//!    leader killed with kill -9, idle and under that load (P5);
//! 2. fleet: N simulated agents (`fleet.rs`) and one real agent process: heartbeat handling and
//!    leader CPU (P4), the real agent's footprint (P7), filling every GPU with 4x8-GPU gangs and
//!    then with single-GPU jobs (P2), submit-to-assignment latency at a steady rate with the
//!    fleet half full (P3), and an agent killed or cut off (P5);
//! 3. restart: three servers restored from a snapshot of a history of many jobs, all killed
//!    with kill -9 and started again: the time until they serve, and their disk use (P6).
//!
//! It prints one table of figures (median and spread over runs, next to the target), one of the
//! CPU time and peak RSS of every process, and writes both as JSON (`--json`).
//!
//! `--tls on` runs everything over mutual TLS with a throwaway CA (servers, an admin client
//! certificate, and one agent certificate per agent, simulated ones issued in memory);
//! `--tls both` runs the cluster and fleet phases twice per run, plain and TLS, alternating
//! which goes first, with " (TLS)" after the name of every figure of the TLS passes.

mod fleet;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tessera_core::acl::{Principal, Role};
use tessera_proto::v1;
use tessera_tests::{AgentProc, Cluster, secure_channel, spec, wait_for_leader_with};
use tessera_tls::issue::{Ca, write_pair};
use tessera_tls::{Security, Tls, TlsFiles};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(about = "Tessera's load generator: the figures P1-P7 on real processes")]
struct Args {
    /// Target scale: 10,000 agents, 256 clients, 10 s phases, 3 runs, 3 kills, 1,000,000 jobs.
    #[arg(long)]
    full: bool,
    /// Concurrent clients (P1, and the submitters of P2) [quick 64, full 256].
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds of the P1 throughput phase, of the P4 steady state and of P3 [quick 3, full 10].
    #[arg(long)]
    seconds: Option<u64>,
    /// Independent runs (fresh clusters each); figures are medians over runs [quick 1, full 3].
    #[arg(long)]
    runs: Option<usize>,
    /// Leader kills per run, idle and under load each [quick 1, full 3].
    #[arg(long)]
    kills: Option<usize>,
    /// Simulated agents of 8 GPUs each (0: skip the fleet phase) [quick 500, full 10,000].
    #[arg(long)]
    agents: Option<usize>,
    /// Jobs in the history the restarted servers hold (0: skip the restart phase)
    /// [quick 50,000, full 1,000,000].
    #[arg(long)]
    restart_jobs: Option<usize>,
    /// Sequential submissions for the single-client latency.
    #[arg(long, default_value_t = 300)]
    single: usize,
    /// Connections to each server the simulated agents share in plain passes (0: one of its own
    /// per agent, as in TLS passes, which always use one per agent).
    #[arg(long, default_value_t = 8)]
    agent_conns: usize,
    /// Plain TCP (off), mutual TLS (on), or both: the cluster and fleet phases once each way
    /// per run, the first way alternating by run ("(TLS)" marks the TLS figures).
    #[arg(long, value_enum, default_value_t = TlsMode::Off)]
    tls: TlsMode,
    /// Submissions per second for P3.
    #[arg(long, default_value_t = 1000)]
    p3_rate: usize,
    /// Longest wait for the fleet to fill (P2); past it the rate is over what was assigned.
    #[arg(long, default_value_t = 120)]
    fill_timeout: u64,
    /// What the fleet phase measures: everything (all), or only registration and the steady
    /// heartbeats (heartbeats: P4 and P7, a few seconds; the fills, P3 and the agent failures
    /// take minutes at 10,000 agents).
    #[arg(long, value_enum, default_value_t = FleetSteps::All)]
    fleet_steps: FleetSteps,
    /// Seconds of heartbeats before P4 and P7 are measured. The leader's connection buffers
    /// reach their working size over the first ~40 s at 10,000 agents (longer with TLS, whose
    /// buffers are larger); a longer warm-up measures the steady state alone.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Seconds the depth phase submits into one fresh cluster (P8) [quick 60, full 300].
    #[arg(long)]
    depth_seconds: Option<u64>,
    /// The servers' log store in the depth phase: raft-engine, sled, or both (side by side in
    /// each run, the first alternating by run; their figures carry the store's name). Other
    /// phases use the servers' default (raft-engine).
    #[arg(long, value_delimiter = ',')]
    log_store: Vec<String>,
    /// Elements of the job array the array phase submits in one request.
    #[arg(long, default_value_t = 100_000)]
    array_size: usize,
    /// Phases to run, of cluster, fleet, restart, depth and array (depth and array are not in
    /// the default).
    #[arg(long, value_delimiter = ',', default_value = "cluster,fleet,restart")]
    phases: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "loadgen.json")]
    json: PathBuf,
}

/// Whether the servers, agents and clients speak mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum TlsMode {
    Off,
    On,
    Both,
}

/// How much of the fleet phase runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum FleetSteps {
    Heartbeats,
    All,
}

/// The flags with the quick or full defaults filled in.
#[derive(Debug, Clone, serde::Serialize)]
struct Scale {
    tls: TlsMode,
    fleet_steps: FleetSteps,
    warmup: u64,
    clients: usize,
    seconds: u64,
    runs: usize,
    kills: usize,
    agents: usize,
    restart_jobs: usize,
    single: usize,
    agent_conns: usize,
    p3_rate: usize,
    fill_timeout: u64,
    depth_seconds: u64,
    array_size: usize,
}

impl Scale {
    fn from(a: &Args) -> Scale {
        let pick = |v: Option<usize>, quick: usize, full: usize| v.unwrap_or(if a.full { full } else { quick });
        Scale {
            tls: a.tls,
            fleet_steps: a.fleet_steps,
            warmup: a.warmup,
            clients: pick(a.clients, 64, 256),
            seconds: a.seconds.unwrap_or(if a.full { 10 } else { 3 }),
            runs: pick(a.runs, 1, 3).max(1),
            kills: pick(a.kills, 1, 3),
            agents: pick(a.agents, 500, 10_000),
            restart_jobs: pick(a.restart_jobs, 50_000, 1_000_000),
            single: a.single,
            agent_conns: a.agent_conns,
            p3_rate: a.p3_rate.max(1),
            fill_timeout: a.fill_timeout,
            depth_seconds: a.depth_seconds.unwrap_or(if a.full { 300 } else { 60 }).max(20),
            array_size: a.array_size.max(1),
        }
    }
}

/// One figure's values over runs.
struct Figure {
    id: &'static str,
    name: String,
    unit: &'static str,
    target: &'static str,
    values: Vec<f64>,
}

/// CPU time and peak RSS of one process at the end of a phase.
#[derive(serde::Serialize)]
struct ProcessUse {
    phase: String,
    run: usize,
    process: String,
    cpu_s: f64,
    peak_rss_mib: f64,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
    processes: Vec<ProcessUse>,
    /// Appended to every figure and phase name: " (TLS)" during a TLS pass of `--tls both`.
    suffix: &'static str,
    /// The passes in the order they ran ("run 0: cluster plain").
    passes: Vec<String>,
}

impl Report {
    fn add(&mut self, id: &'static str, name: impl Into<String>, unit: &'static str, target: &'static str, v: f64) {
        let name = format!("{}{}", name.into(), self.suffix);
        match self.figures.iter_mut().find(|f| f.id == id && f.name == name) {
            Some(f) => f.values.push(v),
            None => self.figures.push(Figure { id, name, unit, target, values: vec![v] }),
        }
    }

    fn process(&mut self, phase: &'static str, run: usize, process: impl Into<String>, pid: Option<u32>) {
        if let Some((cpu_s, peak_rss_mib)) = pid.and_then(fleet::cpu_and_peak_rss) {
            let phase = format!("{phase}{}", self.suffix);
            self.processes.push(ProcessUse { phase, run, process: process.into(), cpu_s, peak_rss_mib });
        }
    }

    fn servers(&mut self, phase: &'static str, run: usize, c: &Cluster) {
        for s in c.servers.values() {
            self.process(phase, run, format!("server {}", s.id), s.pid());
        }
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Plain or mutual TLS
// ---------------------------------------------------------------------------------------------

/// A throwaway CA and the certificates of one load generator: servers 1-3 (host 127.0.0.1), an
/// admin user for the clients and the real agent, as files in a temporary directory; the
/// simulated agents' certificates are issued in memory, per fleet.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    admin: Security,
}

/// How long the throwaway certificates are valid.
const PKI_DAYS: u32 = 2;

/// The real agent's node name (and certificate).
const REAL_AGENT: &str = "real-agent";

impl Pki {
    fn create() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let (ca, files) = Ca::create("Tessera loadgen CA (throwaway)", PKI_DAYS)?;
        write_pair(dir.path(), "ca", &files)?;
        for id in 1..=3 {
            let issued = ca.issue(&Principal::Server { id }, &["127.0.0.1".into()], PKI_DAYS)?;
            write_pair(dir.path(), &format!("server-{id}"), &issued)?;
        }
        let admin = Principal::User {
            name: "loadgen".into(),
            role: Some(Role::Admin),
            tenants: Default::default(),
            token: None,
        };
        write_pair(dir.path(), "user-loadgen", &ca.issue(&admin, &[], PKI_DAYS)?)?;
        let agent = Principal::Agent { node: REAL_AGENT.into() };
        write_pair(dir.path(), &format!("agent-{REAL_AGENT}"), &ca.issue(&agent, &[], PKI_DAYS)?)?;
        let admin = Security::Tls(Tls::load(TlsFiles::in_dir(dir.path(), "user-loadgen"))?);
        Ok(Pki { dir, ca, admin })
    }

    /// One agent certificate per name, issued in memory (on every core: ECDSA key generation
    /// is most of the cost).
    fn agents(&self, names: &[String]) -> anyhow::Result<Vec<Security>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(names.len().max(1));
        let chunk = names.len().div_ceil(threads).max(1);
        let ca = &self.ca;
        let parts: Vec<anyhow::Result<Vec<Security>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|node| {
                                let issued = ca.issue(&Principal::Agent { node: node.clone() }, &[], PKI_DAYS)?;
                                let tls = Tls::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)?;
                                Ok(Security::Tls(tls))
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("issuing panicked")))).collect()
        });
        let mut all = Vec::with_capacity(names.len());
        for p in parts {
            all.extend(p?);
        }
        Ok(all)
    }
}

/// How one pass reaches the servers: plain TCP, or mutual TLS with `Pki`'s certificates.
#[derive(Clone)]
struct Net {
    /// What the clients (submitters, the drain, the leader lookups) connect with: nothing, or
    /// the admin certificate.
    client: Security,
    pki: Option<Arc<Pki>>,
}

impl Net {
    fn plain() -> Net {
        Net { client: Security::Insecure, pki: None }
    }

    fn tls(pki: &Arc<Pki>) -> Net {
        Net { client: pki.admin.clone(), pki: Some(pki.clone()) }
    }

    fn name(&self) -> &'static str {
        if self.pki.is_some() { "TLS" } else { "plain" }
    }

    /// Three servers, each with its own certificate under TLS.
    fn cluster(&self, extra: &[&str]) -> Cluster {
        match &self.pki {
            None => Cluster::start(3, extra),
            Some(pki) => Cluster::start_tls(3, pki.dir.path(), extra),
        }
    }

    /// A client's connection to `addr` (lazy).
    fn channel(&self, addr: &str) -> Channel {
        secure_channel(&self.client, addr)
    }

    async fn leader(&self, addrs: &[String], timeout: Duration) -> Option<u64> {
        wait_for_leader_with(&self.client, addrs, timeout).await
    }

    /// A CLI's `--ca/--cert/--key` (the admin user), or `--insecure`.
    fn cli_args(&self) -> Vec<String> {
        let Some(pki) = &self.pki else { return vec!["--insecure".into()] };
        let f = TlsFiles::in_dir(pki.dir.path(), "user-loadgen");
        [("--ca", f.ca), ("--cert", f.cert), ("--key", f.key)]
            .into_iter()
            .flat_map(|(flag, p)| [flag.to_string(), p.display().to_string()])
            .collect()
    }

    /// The real agent's `--ca/--cert/--key`, or nothing (it then runs `--insecure`).
    fn real_agent_args(&self) -> Vec<String> {
        let Some(pki) = &self.pki else { return Vec::new() };
        let f = TlsFiles::in_dir(pki.dir.path(), &format!("agent-{REAL_AGENT}"));
        [("--ca", f.ca), ("--cert", f.cert), ("--key", f.key)]
            .into_iter()
            .flat_map(|(flag, p)| [flag.to_string(), p.display().to_string()])
            .collect()
    }

    /// How `n` simulated agents named after `prefix` connect: their own certificates and
    /// connections under TLS; plain, the `--agent-conns` shared connections (or their own with 0).
    fn fleet_conns(&self, s: &Scale, prefix: &str, n: usize) -> anyhow::Result<fleet::Conns> {
        Ok(match &self.pki {
            None if s.agent_conns > 0 => fleet::Conns::Shared(s.agent_conns),
            None => fleet::Conns::Own(vec![Security::Insecure; n]),
            Some(pki) => {
                let t = Instant::now();
                let names: Vec<String> = (0..n).map(|i| fleet::agent_name(prefix, i)).collect();
                let all = pki.agents(&names)?;
                eprintln!("{n} agent certificates issued in {:.1} s", t.elapsed().as_secs_f64());
                fleet::Conns::Own(all)
            }
        })
    }
}

/// SIGINT or SIGTERM, whichever comes first; its name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Raise the soft limit of open files to the hard one: a TLS fleet holds a connection per
/// agent here and on the leader (the servers inherit the limit).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => eprintln!("open files limit raised from {soft} to {hard}"),
            Err(e) => eprintln!("open files limit stays at {soft}: {e}"),
        },
        Ok(_) | Err(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: the cluster (P1, P5 leader kill)
// ---------------------------------------------------------------------------------------------

/// `clients` clients submitting to every server until `until`; returns acknowledged latencies.
async fn submit_load(net: Net, addrs: Vec<String>, clients: usize, until: Instant, tag: String) -> Vec<f64> {
    submit_load_timed(net, addrs, clients, Instant::now(), until, tag, spec("load"))
        .await
        .into_iter()
        .map(|(_, l)| l)
        .collect()
}

/// Kill the leader with kill -9 and time until a write is accepted again; restarts it after.
async fn kill_leader(net: &Net, c: &mut Cluster, tag: &str) -> anyhow::Result<f64> {
    let leader = net.leader(&c.running_addrs(), Duration::from_secs(20)).await.context("no leader")?;
    c.servers.get_mut(&leader).context("leader id")?.kill();
    let others = c.running_addrs();
    let t = Instant::now();
    let mut i = 0;
    loop {
        // Short deadlines so a request stuck on the dead leader does not hide the recovery.
        let addr = &others[i % others.len()];
        i += 1;
        let mut cl = v1::job_service_client::JobServiceClient::new(net.channel(addr));
        let mut req = tonic::Request::new(v1::SubmitJobRequest {
            spec: Some(spec("after-kill")),
            idempotency_key: format!("{tag}-{i}"),
        });
        req.set_timeout(Duration::from_millis(300));
        if cl.submit_job(req).await.is_ok() {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("no write accepted 30 s after the leader was killed");
        }
    }
    let took = ms(t.elapsed());
    c.servers.get_mut(&leader).context("leader id")?.restart();
    Ok(took)
}

/// How long after `t` one of `addrs` first names a leader other than `old`, polling every 10 ms.
async fn elected(net: &Net, addrs: &[String], old: u64, t: Instant) -> Option<f64> {
    let mut clients: Vec<_> =
        addrs.iter().map(|a| v1::cluster_service_client::ClusterServiceClient::new(net.channel(a))).collect();
    while t.elapsed() < Duration::from_secs(30) {
        for c in clients.iter_mut() {
            let mut req = tonic::Request::new(v1::StatusRequest {});
            req.set_timeout(Duration::from_millis(200));
            if let Ok(r) = c.status(req).await
                && let Some(l) = r.into_inner().leader_id
                && l != old
                && l != 0
            {
                return Some(ms(t.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// P9: kill -9 the leader and at once run `tessera job submit` with every server listed, the
/// dead one first. How long after the kill the CLI returned, and how long after the survivors
/// first named the new leader; restarts the killed server after.
async fn cli_submit_after_kill(net: &Net, c: &mut Cluster, tag: &str) -> anyhow::Result<(f64, f64)> {
    let leader = net.leader(&c.running_addrs(), Duration::from_secs(20)).await.context("no leader")?;
    let dead = c.servers.get(&leader).context("leader id")?.addr.clone();
    let mut servers = vec![dead];
    servers.extend(c.servers.values().filter(|s| s.id != leader).map(|s| s.addr.clone()));
    let mut args: Vec<String> = ["job", "submit"].map(String::from).to_vec();
    args.extend(net.cli_args());
    args.extend(["--server".into(), servers.join(","), "--name".into(), tag.into(), "-o".into(), "json".into()]);
    args.extend(["--".into(), "true".into()]);
    c.servers.get_mut(&leader).context("leader id")?.kill();
    let t = Instant::now();
    let others = c.running_addrs();
    let election = elected(net, &others, leader, t);
    let cli = tokio::process::Command::new(tessera_tests::tessera_bin()).args(&args).kill_on_drop(true).output();
    let (election, out) = tokio::join!(election, cli);
    let returned = ms(t.elapsed());
    let out = out.context("run tessera job submit")?;
    c.servers.get_mut(&leader).context("leader id")?.restart();
    if !out.status.success() {
        bail!("tessera job submit after the leader kill failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let election = election.context("no new leader named within 30 s")?;
    Ok((returned, returned - election))
}

async fn cluster_phase(s: &Scale, run: usize, net: &Net, report: &mut Report) -> anyhow::Result<()> {
    let mut c = net.cluster(&[]);
    let addrs = c.running_addrs();
    net.leader(&addrs, Duration::from_secs(20)).await.context("no leader")?;

    let servers_cpu = |c: &Cluster| -> f64 {
        c.servers.values().filter_map(|s| s.pid().and_then(fleet::cpu_and_peak_rss)).map(|(cpu, _)| cpu).sum()
    };
    let cpu0 = servers_cpu(&c);
    let start = Instant::now();
    let until = start + Duration::from_secs(s.seconds);
    let lat = sorted(submit_load(net.clone(), addrs.clone(), s.clients, until, format!("r{run}")).await);
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    let cpu = servers_cpu(&c) - cpu0;
    let clients = s.clients;
    report.add("P1", format!("submissions acknowledged, {clients} clients"), "/s", ">= 15,000", rate);
    // What the servers spend per write, apart from the load generator's own work (its TLS
    // clients share these cores): the cost TLS adds on a real server.
    report.add(
        "P1",
        format!("servers' CPU per 1,000 acknowledged submissions, {clients} clients"),
        "core-ms",
        "",
        cpu * 1e6 / lat.len().max(1) as f64,
    );
    report.add("P1", format!("submit latency p50, {clients} clients"), "ms", "", pct(&lat, 0.5));
    report.add("P1", format!("submit latency p99, {clients} clients"), "ms", "<= 50", pct(&lat, 0.99));

    let mut client = v1::job_service_client::JobServiceClient::new(net.channel(&addrs[0]));
    let mut single = Vec::new();
    for n in 0..s.single {
        let t = Instant::now();
        let req = v1::SubmitJobRequest { spec: Some(spec("one")), idempotency_key: format!("r{run}-single-{n}") };
        if client.submit_job(req).await.is_ok() {
            single.push(ms(t.elapsed()));
        }
    }
    report.add("P1", "submit latency p50, one client", "ms", "<= 2", pct(&sorted(single), 0.5));

    for k in 0..s.kills {
        let took = kill_leader(net, &mut c, &format!("r{run}-kill{k}")).await?;
        report.add("P5", "leader kill -9 -> write accepted, idle", "ms", "<= 1,000", took);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for k in 0..s.kills {
        let addrs = c.running_addrs();
        let until = Instant::now() + Duration::from_secs(3);
        let load = tokio::spawn(submit_load(net.clone(), addrs, s.clients, until, format!("r{run}-load{k}")));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let took = kill_leader(net, &mut c, &format!("r{run}-lkill{k}")).await?;
        report.add(
            "P5",
            format!("leader kill -9 -> write accepted, {clients} clients loading"),
            "ms",
            "<= 1,000",
            took,
        );
        let _ = load.await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for k in 0..s.kills {
        let (returned, after_election) = cli_submit_after_kill(net, &mut c, &format!("r{run}-cli{k}")).await?;
        report.add("P9", "leader kill -9 -> CLI job submit returned", "ms", "", returned);
        report.add("P9", "CLI job submit returned after the new leader was named", "ms", "<= 1,000", after_election);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    report.servers("cluster", run, &c);
    eprintln!("run {run}: cluster phase done ({})", net.name());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Depth (P8, and P9's window): a fresh cluster filling with pending jobs
// ---------------------------------------------------------------------------------------------

/// `clients` clients submitting to every server until `until`: every acknowledgement with its
/// time since `t0` (s) and its latency (ms).
async fn submit_load_timed(
    net: Net,
    addrs: Vec<String>,
    clients: usize,
    t0: Instant,
    until: Instant,
    tag: String,
    job: v1::JobSpec,
) -> Vec<(f64, f64)> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (addr, tag, job) = (addrs[c % addrs.len()].clone(), tag.clone(), job.clone());
        let ch = net.channel(&addr);
        tasks.push(tokio::spawn(async move {
            let mut client = v1::job_service_client::JobServiceClient::new(ch);
            let mut acks = Vec::new();
            let mut n = 0;
            while Instant::now() < until {
                let t = Instant::now();
                let mut req = tonic::Request::new(v1::SubmitJobRequest {
                    spec: Some(job.clone()),
                    idempotency_key: format!("{tag}-c{c}-{n}"),
                });
                req.set_timeout(Duration::from_secs(2));
                if client.submit_job(req).await.is_ok() {
                    acks.push((t0.elapsed().as_secs_f64(), ms(t.elapsed())));
                } else {
                    // The server may be the one just killed: back off a little.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n += 1;
            }
            acks
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

/// Acknowledgements per second and p99 latency of those sent in `[from, to)` seconds.
fn window(acks: &[(f64, f64)], from: f64, to: f64) -> (f64, f64) {
    let lat = sorted(acks.iter().filter(|(at, _)| *at >= from && *at < to).map(|(_, l)| *l).collect());
    (lat.len() as f64 / (to - from), pct(&lat, 0.99))
}

/// P8: `--clients` clients submit into a fresh cluster without agents for `--depth-seconds`, so
/// every job stays pending and the queue only deepens: the rate in the first and the last
/// stretch (a minute, or a third of a shorter run), the worst 10-second p99. Then P9's window:
/// 10 s more of the same load with the leader killed 3 s in, against the last stretch's rate.
async fn depth_phase(s: &Scale, run: usize, net: &Net, report: &mut Report, store: Option<&str>) -> anyhow::Result<()> {
    let extra: Vec<&str> = store.map(|st| vec!["--log-store", st]).unwrap_or_default();
    let mut c = net.cluster(&extra);
    let addrs = c.running_addrs();
    net.leader(&addrs, Duration::from_secs(20)).await.context("no leader")?;
    let secs = s.depth_seconds as f64;
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(s.depth_seconds);
    let acks =
        submit_load_timed(net.clone(), addrs.clone(), s.clients, t0, until, format!("r{run}-depth"), spec("load"))
            .await;
    let stretch = 60f64.min(secs / 3.0).floor();
    let (first, _) = window(&acks, 0.0, stretch);
    let (last, _) = window(&acks, secs - stretch, secs);
    let worst_p99 = (0..(secs / 10.0) as usize)
        .map(|w| window(&acks, w as f64 * 10.0, (w + 1) as f64 * 10.0).1)
        .fold(f64::NAN, f64::max);
    let all = sorted(acks.iter().map(|(_, l)| *l).collect());
    let clients = s.clients;
    report.add("P8", format!("depth: submissions/s, first {stretch} s, {clients} clients"), "/s", ">= 15,000", first);
    report.add("P8", format!("depth: submissions/s, last {stretch} s"), "/s", "", last);
    report.add("P8", "depth: last stretch's rate / first's", "%", ">= 90", last / first * 100.0);
    report.add("P8", "depth: p99, worst 10 s window", "ms", "<= 50", worst_p99);
    report.add("P8", "depth: p99, whole run", "ms", "<= 50", pct(&all, 0.99));
    report.add("P8", format!("depth: jobs pending after {secs} s"), "jobs", ">= 1,000,000 (300 s)", acks.len() as f64);
    report.servers("depth", run, &c);

    // P9's window: the same load for 10 s, the leader killed 3 s in.
    let t1 = Instant::now();
    let load = tokio::spawn(submit_load_timed(
        net.clone(),
        addrs.clone(),
        s.clients,
        t1,
        t1 + Duration::from_secs(10),
        format!("r{run}-depthkill"),
        spec("load"),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = net.leader(&addrs, Duration::from_secs(5)).await.context("no leader before the kill")?;
    c.servers.get_mut(&leader).context("leader id")?.kill();
    let during = load.await.context("the load")?;
    report.add(
        "P9",
        "submissions/s over 10 s holding a leader kill / steady rate",
        "%",
        ">= 70",
        during.len() as f64 / 10.0 / last * 100.0,
    );
    eprintln!("run {run}: depth phase done ({}), {} jobs pending", net.name(), acks.len());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Arrays: one submission of a huge job array, and other tenants' admission while it is placed
// ---------------------------------------------------------------------------------------------

/// Submit an array of `n` single-GPU elements running 1 s each (of `model`, "" for any) in one
/// request: its id and the round trip in milliseconds.
async fn submit_array(
    client: &mut v1::job_service_client::JobServiceClient<Channel>,
    tag: &str,
    n: usize,
    name: &str,
    model: &str,
) -> anyhow::Result<(u64, f64)> {
    let mut array = spec(name);
    array.tenant = "sweep".into();
    array.array = format!("0-{}", n - 1);
    array.env.insert("SIM_RUN_MS".into(), "1000".into());
    if let Some(r) = array.resources.as_mut() {
        r.gpu_model = model.into();
    }
    let t = Instant::now();
    let mut req =
        tonic::Request::new(v1::SubmitJobRequest { spec: Some(array), idempotency_key: format!("{tag}-{name}") });
    req.set_timeout(Duration::from_secs(30));
    let id = client.submit_job(req).await.context("the array's submission")?.into_inner().job_id;
    Ok((id, ms(t.elapsed())))
}

/// A fresh cluster and `--agents` simulated agents. Other tenants' single-GPU jobs (each running
/// 200 ms) from `--clients` clients for `--seconds` (P1 before); then the same load while a
/// `--array-size` array that no node can run waits in the queue (what its depth costs), and,
/// once that is cancelled, while an array of 1-second single-GPU elements submitted in one
/// request (its round trip) is placed on the fleet (what its elements' placements, starts and
/// exits cost), with how many elements started.
async fn array_phase(s: &Scale, run: usize, net: &Net, report: &mut Report) -> anyhow::Result<()> {
    let c = net.cluster(&[]);
    let addrs = c.running_addrs();
    let leader = net.leader(&addrs, Duration::from_secs(20)).await.context("no leader")?;
    let leader_addr = c.servers[&leader].addr.clone();
    let leader_index = addrs.iter().position(|a| *a == leader_addr).unwrap_or(0);
    let prefix = format!("arr{run}");
    let conns = net.fleet_conns(s, &prefix, s.agents)?;
    let fleet = fleet::start(&addrs, leader_index, &prefix, s.agents, conns).await?;
    let mut other = spec("other");
    other.tenant = "others".into();
    other.env.insert("SIM_RUN_MS".into(), "200".into());
    let secs = s.seconds as f64;
    let load = |tag: &str| {
        let t0 = Instant::now();
        submit_load_timed(
            net.clone(),
            addrs.clone(),
            s.clients,
            t0,
            t0 + Duration::from_secs(s.seconds),
            format!("r{run}-{tag}"),
            other.clone(),
        )
    };
    let before = load("array-before").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let n = s.array_size;
    let mut client = v1::job_service_client::JobServiceClient::new(net.channel(&leader_addr));
    // First an array no node can run (a GPU model the fleet lacks): its elements only wait, so
    // this window shows what its depth in the queue costs the others.
    let (waiting_id, _) = submit_array(&mut client, &format!("r{run}"), n, "sweep-waiting", "B200").await?;
    let waiting = load("array-waiting").await;
    client
        .cancel_job(v1::CancelJobRequest { job_id: waiting_id, reason: "loadgen".into() })
        .await
        .context("cancelling the waiting array")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Then one that runs: 1-second elements on the whole fleet.
    let (id, admitted) = submit_array(&mut client, &format!("r{run}"), n, "sweep", "").await?;
    let during = load("array-during").await;
    let job = client
        .get_job(v1::GetJobRequest { job_id: id, consistency: 0 })
        .await
        .context("the array")?
        .into_inner()
        .job
        .context("no job")?;
    let a = job.array.context("the array's counts")?;
    let started = a.total - a.not_created - u64::from(a.pending);
    let lat = |acks: &[(f64, f64)]| sorted(acks.iter().map(|(_, l)| *l).collect());
    let rate = |acks: &[(f64, f64)]| acks.len() as f64 / secs;
    let (rate_before, rate_waiting, rate_during) = (rate(&before), rate(&waiting), rate(&during));
    report.add("P1", format!("array: {n}-element submission, one round trip"), "ms", "", admitted);
    report.add(
        "P1",
        format!("array: other tenants' submissions/s before, {} clients", s.clients),
        "/s",
        "",
        rate_before,
    );
    report.add("P1", "array: other tenants' submissions/s while one waits", "/s", "", rate_waiting);
    report.add("P1", "array: while one waits / before", "%", ">= 90", rate_waiting / rate_before.max(1e-9) * 100.0);
    report.add("P1", "array: other tenants' submissions/s while one is placed", "/s", "", rate_during);
    report.add("P1", "array: while one is placed / before", "%", "", rate_during / rate_before.max(1e-9) * 100.0);
    report.add("P1", "array: other tenants' p99 before", "ms", "", pct(&lat(&before), 0.99));
    report.add("P1", "array: other tenants' p99 while one waits", "ms", "", pct(&lat(&waiting), 0.99));
    report.add("P1", "array: other tenants' p99 while one is placed", "ms", "", pct(&lat(&during), 0.99));
    report.add("P1", format!("array: elements started in those {secs} s"), "", "", started as f64);
    report.servers("array", run, &c);
    drop(fleet);
    eprintln!("run {run}: array phase done ({}), {started} elements started", net.name());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phase 2: the fleet (P2, P3, P4, P5 agent failures, P7)
// ---------------------------------------------------------------------------------------------

fn gang_spec(name: &str) -> v1::JobSpec {
    v1::JobSpec { shards: 4, resources: Some(v1::Resources { gpus: 8, ..Default::default() }), ..spec(name) }
}

/// Submit `n` jobs built by `make` from `clients` clients; returns their ids.
async fn submit_many(
    net: &Net,
    addrs: &[String],
    clients: usize,
    n: usize,
    make: Arc<dyn Fn(usize) -> (v1::JobSpec, String) + Send + Sync>,
    deadline: Instant,
) -> Vec<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..clients.max(1) {
        let (ch, next, make) = (net.channel(&addrs[w % addrs.len()]), next.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut cl = v1::job_service_client::JobServiceClient::new(ch);
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return ids;
                }
                let (spec, key) = make(i);
                // Retried with its key until acknowledged: every job is submitted exactly once.
                for _ in 0..20 {
                    if Instant::now() >= deadline {
                        return ids;
                    }
                    let req = v1::SubmitJobRequest { spec: Some(spec.clone()), idempotency_key: key.clone() };
                    if let Ok(r) = cl.submit_job(req).await {
                        ids.push(r.into_inner().job_id);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap_or_default());
    }
    ids
}

async fn cancel_many(net: &Net, addrs: &[String], clients: usize, ids: Vec<u64>) {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..clients.max(1) {
        let (ch, next, ids) = (net.channel(&addrs[w % addrs.len()]), next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut cl = v1::job_service_client::JobServiceClient::new(ch);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&job_id) = ids.get(i) else { return };
                // Retried through a leader change: a job left running would hold its GPU.
                for _ in 0..20 {
                    if cl.cancel_job(v1::CancelJobRequest { job_id, reason: String::new() }).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Wait until `done()` or `timeout`; true if done.
async fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Fill the fleet with `jobs` jobs of `shards` shards each; (seconds, shards assigned, acks/s).
async fn fill(
    s: &Scale,
    net: &Net,
    addrs: &[String],
    stats: &fleet::FleetStats,
    jobs: usize,
    shards: usize,
    make: Arc<dyn Fn(usize) -> (v1::JobSpec, String) + Send + Sync>,
) -> (f64, u64, f64, Vec<u64>) {
    let before = stats.assigned.load(Ordering::Relaxed);
    let assigned = || stats.assigned.load(Ordering::Relaxed) - before;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(s.fill_timeout);
    let submit = tokio::spawn({
        let (net, addrs) = (net.clone(), addrs.to_vec());
        let clients = s.clients;
        async move {
            let t = Instant::now();
            let ids = submit_many(&net, &addrs, clients, jobs, make, deadline).await;
            (ids, t.elapsed())
        }
    });
    let total = (jobs * shards) as u64;
    wait_until(deadline.saturating_duration_since(Instant::now()), || assigned() >= total).await;
    let took = t.elapsed().as_secs_f64();
    let got = assigned();
    let (ids, submit_took) = submit.await.unwrap_or_default();
    (took, got, ids.len() as f64 / submit_took.as_secs_f64().max(1e-9), ids)
}

/// The P2 figures of one fill: `shards` shards on `gpus` GPUs, `got` of them assigned in
/// `took` seconds. Figure names stay the same from run to run (so runs are one row each).
fn report_fill(report: &mut Report, what: &str, shards: usize, gpus: usize, took: f64, got: u64) {
    report.add("P2", format!("{what}: shards placed/s filling {gpus} GPUs"), "/s", ">= 10,000", got as f64 / took);
    report.add("P2", format!("{what}: time to fill {gpus} GPUs"), "s", "<= 8", took);
    let missing = (shards as u64).saturating_sub(got) as f64;
    report.add("P2", format!("{what}: shards not assigned within --fill-timeout"), "", "0", missing);
}

/// Cancel `ids` and wait until the agents have stopped `shards` shards.
async fn free(s: &Scale, net: &Net, addrs: &[String], stats: &fleet::FleetStats, ids: Vec<u64>, shards: u64) {
    let ended = stats.ended.load(Ordering::Relaxed);
    cancel_many(net, addrs, s.clients, ids).await;
    let freed = || stats.ended.load(Ordering::Relaxed) - ended >= shards;
    if !wait_until(Duration::from_secs(s.fill_timeout.max(60) * 2), freed).await {
        eprintln!("not every cancelled shard was stopped in time; the next figures start from a fuller fleet");
    }
    // The exits are acknowledged once applied; give the last ones a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// P3: `rate` single-GPU jobs per second for `seconds`, each running 1 s on its agent; the
/// latency from sending the submission to its agent getting the assignment.
async fn steady_submissions(
    net: &Net,
    addrs: &[String],
    stats: &Arc<fleet::FleetStats>,
    rate: usize,
    seconds: u64,
    run: usize,
) {
    let n = rate * seconds as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let clients: Vec<_> =
        (0..16).map(|i| v1::job_service_client::JobServiceClient::new(net.channel(&addrs[i % addrs.len()]))).collect();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        let mut cl = clients[i % clients.len()].clone();
        let stats = stats.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("p3-{run}-{i}");
            let mut spec = spec(&name);
            spec.env.insert("SIM_RUN_MS".into(), "1000".into());
            if let Ok(mut m) = stats.submitted_at.lock() {
                m.insert(name.clone(), Instant::now());
            }
            let _ = cl.submit_job(v1::SubmitJobRequest { spec: Some(spec), idempotency_key: name }).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let pending = || stats.submitted_at.lock().map(|m| m.len()).unwrap_or(0);
    wait_until(Duration::from_secs(10), || pending() == 0).await;
}

/// Fail one agent that runs shards; the time until every one of its jobs is assigned again.
async fn agent_failure(fleet: &mut fleet::Fleet, how: fleet::Failure) -> anyhow::Result<f64> {
    let t = Instant::now();
    let jobs = fleet.fail_one(how).context("no simulated agent runs a shard")?;
    let stats = fleet.stats.clone();
    let done = || stats.reassigned.lock().is_ok_and(|r| jobs.iter().all(|j| r.get(j).is_some_and(|at| *at > t)));
    if !wait_until(Duration::from_secs(30), done).await {
        bail!("the shards of a {how:?} agent were not assigned elsewhere within 30 s");
    }
    let last = stats.reassigned.lock().ok().and_then(|r| jobs.iter().filter_map(|j| r.get(j)).max().copied());
    Ok(last.map_or(f64::NAN, |l| ms(l.duration_since(t))))
}

/// How many times a server became leader, after the first, by the servers' logs.
fn leader_changes(c: &Cluster) -> usize {
    let elected = |l: &&str| l.contains("raft role changed") && l.contains("Leader");
    c.servers.values().map(|s| s.log().lines().filter(elected).count()).sum::<usize>().saturating_sub(1)
}

/// The servers' role changes and snapshots, and the first of their warnings and errors, for a
/// phase that failed.
fn warnings(c: &Cluster) -> String {
    let mut out = String::new();
    for s in c.servers.values() {
        let log = s.log();
        let notable = |l: &&str| l.contains("role changed") || l.contains("snapshot");
        let bad = |l: &&str| l.contains("WARN") || l.contains("ERROR");
        let count = log.lines().filter(bad).count();
        out.push_str(&format!(
            "--- server {}: {count} warnings/errors; role changes, snapshots, the first 10:\n",
            s.id
        ));
        let mut shown = 0;
        for l in log.lines().filter(|l| notable(l) || bad(l)) {
            if notable(&l) || shown < 10 {
                shown += usize::from(!notable(&l));
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

async fn fleet_phase(s: &Scale, run: usize, net: &Net, report: &mut Report) -> anyhow::Result<()> {
    let c = net.cluster(&[]);
    let result = fleet_measure(s, run, net, report, &c).await;
    if result.is_err() {
        eprintln!("{}", warnings(&c));
    }
    result
}

async fn fleet_measure(s: &Scale, run: usize, net: &Net, report: &mut Report, c: &Cluster) -> anyhow::Result<()> {
    let addrs = c.running_addrs();
    let leader = net.leader(&addrs, Duration::from_secs(20)).await.context("no leader")?;
    let leader_addr = c.servers[&leader].addr.clone();
    let leader_pid = c.servers[&leader].pid().context("leader pid")?;
    let n = s.agents;

    // One real agent process, drained so that it only samples and reports (P7).
    let agent_args = net.real_agent_args();
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let real = AgentProc::start(REAL_AGENT, &addrs, "8xH100-80GB", c.dir.path(), &agent_args);
    let prefix = format!("sim{run}");
    let conns = net.fleet_conns(s, &prefix, n)?;
    let t = Instant::now();
    let leader_index = addrs.iter().position(|a| *a == leader_addr).unwrap_or(0);
    let mut fleet = fleet::start(&addrs, leader_index, &prefix, n, conns).await?;
    report.add("", format!("agents registered, {n} agents"), "/s", "", n as f64 / t.elapsed().as_secs_f64());
    let mut nodes = v1::node_service_client::NodeServiceClient::new(net.channel(&leader_addr));
    let drain = v1::DrainNodeRequest {
        node: Some(v1::NodeRef { node: Some(v1::node_ref::Node::Name(REAL_AGENT.into())) }),
        deadline_seconds: None,
        reason: "loadgen: measured idle".into(),
    };
    let mut drained = false;
    for _ in 0..100 {
        if nodes.drain_node(drain.clone()).await.is_ok() {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !drained {
        bail!("the real agent did not register");
    }

    // P4 and P7: steady heartbeats.
    if s.warmup > 2 {
        eprintln!("run {run}: {n} agents' heartbeats warming up for {} s", s.warmup);
    }
    tokio::time::sleep(Duration::from_secs(s.warmup)).await;
    let (cpu0, _) = fleet::cpu_and_peak_rss(leader_pid).context("leader /proc")?;
    let (acpu0, _) = real.pid().and_then(fleet::cpu_and_peak_rss).context("agent /proc")?;
    fleet.stats.measuring.store(true, Ordering::Relaxed);
    // The pid lets whoever watches attach a profiler (`perf record -p`) for these seconds.
    eprintln!("run {run}: measuring {n} agents' heartbeats for {} s, leader pid {leader_pid}", s.seconds);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(s.seconds)).await;
    fleet.stats.measuring.store(false, Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    let (cpu1, _) = fleet::cpu_and_peak_rss(leader_pid).context("leader /proc")?;
    let (acpu1, arss) = real.pid().and_then(fleet::cpu_and_peak_rss).context("agent /proc")?;
    let hb = sorted(std::mem::take(&mut *fleet.stats.heartbeat_ms.lock().await));
    report.add("P4", format!("leader CPU, {n} agents at 1 Hz"), "cores", "<= 1", (cpu1 - cpu0) / secs);
    report.add("P4", "heartbeat handling p50", "ms", "", pct(&hb, 0.5));
    report.add("P4", "heartbeat handling p99", "ms", "<= 10", pct(&hb, 0.99));
    report.add("P7", "agent CPU, 8 simulated GPUs at 1 Hz", "% core", "<= 0.2", (acpu1 - acpu0) / secs * 100.0);
    report.add("P7", "agent peak RSS", "MiB", "<= 20", arss);
    eprintln!("run {run}: {n} agents connected, heartbeats measured ({})", net.name());

    if s.fleet_steps == FleetSteps::All {
        fleet_load(s, run, net, report, &addrs, &mut fleet).await?;
    }

    let lost = fleet.stats.streams_lost.load(Ordering::Relaxed) as f64;
    report.add("", "agent streams the servers ended (the agents reconnected)", "", "0", lost);
    report.add("", "leader changes after the first election", "", "0", leader_changes(c) as f64);
    report.servers("fleet", run, c);
    report.process("fleet", run, "agent (real process, 8 simulated GPUs)", real.pid());
    report.process("fleet", run, format!("loadgen ({n} simulated agents, clients)"), Some(std::process::id()));
    drop(fleet);
    Ok(())
}

/// The fleet under load, after the heartbeats: P2 (filling every GPU), P3 (steady submissions
/// with the fleet half full) and P5 (an agent killed, one cut off).
async fn fleet_load(
    s: &Scale,
    run: usize,
    net: &Net,
    report: &mut Report,
    addrs: &[String],
    fleet: &mut fleet::Fleet,
) -> anyhow::Result<()> {
    let n = s.agents;
    let addrs = addrs.to_vec();
    // P2: every GPU, first with 4x8-GPU gangs, then with single-GPU jobs.
    let gangs = n / 4;
    let (took, got, _, ids) = fill(
        s,
        net,
        &addrs,
        &fleet.stats,
        gangs,
        4,
        Arc::new(move |i| (gang_spec("gang"), format!("r{run}-gang-{i}"))),
    )
    .await;
    report_fill(report, "4x8-GPU gangs", gangs * 4, gangs * 32, took, got);
    eprintln!("run {run}: gangs filled {got} shards in {took:.1} s");
    if got < (gangs * 4) as u64 {
        let short = fleet.short_of(1);
        eprintln!("run {run}: {} agents hold no gang shard: {}", short.len(), short.join("; "));
    }
    free(s, net, &addrs, &fleet.stats, ids, got).await;

    let (took, got, acks, ids) =
        fill(s, net, &addrs, &fleet.stats, n * 8, 1, Arc::new(move |i| (spec("fill"), format!("r{run}-fill-{i}"))))
            .await;
    report_fill(report, "single-GPU jobs", n * 8, n * 8, took, got);
    if got < (n * 8) as u64 {
        let short = fleet.short_of(8);
        eprintln!("run {run}: {} agents hold fewer than 8 shards: {}", short.len(), short.join("; "));
    }
    report.add("P2", "single-GPU jobs: submissions acknowledged meanwhile", "/s", "", acks);
    eprintln!("run {run}: single-GPU jobs filled {got} shards in {took:.1} s");

    // P3: half the fleet free, then a steady stream of short jobs.
    let half: Vec<u64> = ids.iter().copied().step_by(2).collect();
    let count = half.len() as u64;
    free(s, net, &addrs, &fleet.stats, half, count).await;
    steady_submissions(net, &addrs, &fleet.stats, s.p3_rate, s.seconds, run).await;
    let lat = sorted(std::mem::take(&mut *fleet.stats.assign_ms.lock().map_err(|_| anyhow::anyhow!("poisoned"))?));
    let missing = fleet.stats.submitted_at.lock().map(|m| m.len()).unwrap_or(0);
    report.add("P3", format!("submit -> assigned p50, {}/s, fleet half full", s.p3_rate), "ms", "", pct(&lat, 0.5));
    report.add(
        "P3",
        format!("submit -> assigned p99, {}/s, fleet half full", s.p3_rate),
        "ms",
        "<= 100",
        pct(&lat, 0.99),
    );
    report.add("P3", "jobs not assigned 10 s after the last submission", "", "0", missing as f64);
    eprintln!("run {run}: steady submissions measured ({} assigned)", lat.len());

    // P5: an agent's process dies; another goes silent with its connection open.
    let or_nan = |r: anyhow::Result<f64>| {
        r.unwrap_or_else(|e| {
            eprintln!("run {run}: {e:#}");
            f64::NAN
        })
    };
    let killed = or_nan(agent_failure(fleet, fleet::Failure::Killed).await);
    report.add("P5", format!("agent killed -> its shards assigned elsewhere, {n} agents"), "ms", "<= 3,000", killed);
    let cut = or_nan(agent_failure(fleet, fleet::Failure::CutOff).await);
    report.add("P5", format!("agent cut off (no FIN) -> shards assigned elsewhere, {n} agents"), "ms", "<= 5,000", cut);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phase 3: restart with a long history (P6)
// ---------------------------------------------------------------------------------------------

fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            // Blocks actually allocated (sparse files count what they use).
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Until a linearizable read of `job` and a write both succeed through `addr`.
async fn serving(net: &Net, addr: &str, job: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut cl = v1::job_service_client::JobServiceClient::new(net.channel(addr));
        let mut read = tonic::Request::new(v1::GetJobRequest { job_id: job, ..Default::default() });
        read.set_timeout(Duration::from_millis(500));
        if cl.get_job(read).await.is_ok() {
            let mut write = tonic::Request::new(v1::SubmitJobRequest {
                spec: Some(spec("after-restart")),
                idempotency_key: format!("restart-{}", Instant::now().elapsed().as_nanos()),
            });
            write.set_timeout(Duration::from_millis(500));
            if cl.submit_job(write).await.is_ok() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("{addr} did not serve within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn restart_phase(
    s: &Scale,
    run: usize,
    net: &Net,
    report: &mut Report,
    snapshot: &Path,
    logical: u64,
) -> anyhow::Result<()> {
    let file = snapshot.display().to_string();
    let mut c = net.cluster(&["--restore-from", &file]);
    let addrs = c.running_addrs();
    net.leader(&addrs, Duration::from_secs(120)).await.context("no leader after the restore")?;
    serving(net, &addrs[0], 1, Duration::from_secs(60)).await?;
    let jobs = s.restart_jobs;
    let disk = c.servers.keys().map(|id| disk_bytes(&c.dir.path().join(format!("s{id}")))).max().unwrap_or(0);
    report.add(
        "P6",
        format!("disk / logical state, {jobs} jobs (largest server)"),
        "x",
        "<= 3",
        disk as f64 / logical as f64,
    );
    report.servers("restart (restore)", run, &c);

    for srv in c.servers.values_mut() {
        srv.kill();
    }
    let t = Instant::now();
    for srv in c.servers.values_mut() {
        srv.restart();
    }
    let addrs = c.running_addrs();
    let mut waits = Vec::new();
    for a in &addrs {
        waits.push(serving(net, a, 1, Duration::from_secs(120)));
    }
    for w in waits {
        w.await?;
    }
    report.add(
        "P6",
        format!("all 3 servers kill -9 + restart -> serving, {jobs} jobs"),
        "s",
        "<= 5",
        t.elapsed().as_secs_f64(),
    );
    report.servers("restart", run, &c);
    eprintln!("run {run}: restart measured");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn print_report(s: &Scale, r: &Report, path: &Path) -> anyhow::Result<()> {
    let stats = |f: &Figure| {
        let v = sorted(f.values.clone());
        (pct(&v, 0.5), v.first().copied().unwrap_or(f64::NAN), v.last().copied().unwrap_or(f64::NAN))
    };
    println!(
        "\nruns {}, {} clients, {} agents, {} jobs for the restart, {} s phases, TLS {:?}",
        s.runs, s.clients, s.agents, s.restart_jobs, s.seconds, s.tls
    );
    if s.tls == TlsMode::Both {
        println!("passes in order: {}", r.passes.join("; "));
    }
    println!("{:<4} {:<72} {:>11} {:>11} {:>11} {:<7} {:<10}", "", "figure", "median", "min", "max", "unit", "target");
    for f in &r.figures {
        let (m, lo, hi) = stats(f);
        println!("{:<4} {:<72} {m:>11.2} {lo:>11.2} {hi:>11.2} {:<7} {:<10}", f.id, f.name, f.unit, f.target);
    }
    println!("\n{:<18} {:>3}  {:<44} {:>9} {:>13}", "phase", "run", "process", "CPU (s)", "peak RSS (MiB)");
    for p in &r.processes {
        println!("{:<18} {:>3}  {:<44} {:>9.1} {:>13.1}", p.phase, p.run, p.process, p.cpu_s, p.peak_rss_mib);
    }
    let figures: Vec<_> = r
        .figures
        .iter()
        .map(|f| {
            let (m, lo, hi) = stats(f);
            serde_json::json!({"id": f.id, "figure": f.name, "unit": f.unit, "target": f.target,
                "median": m, "min": lo, "max": hi, "runs": f.values})
        })
        .collect();
    let json = serde_json::json!({"scale": s, "passes": r.passes, "figures": figures, "processes": r.processes});
    std::fs::write(path, serde_json::to_vec_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = Scale::from(&args);
    for p in &args.phases {
        if !["cluster", "fleet", "restart", "depth", "array"].contains(&p.as_str()) {
            bail!("--phases: unknown phase {p:?} (cluster, fleet, restart, depth, array)");
        }
    }
    let phase = |p: &str| args.phases.iter().any(|x| x == p);
    let mut stores: Vec<&'static str> = Vec::new();
    for st in &args.log_store {
        match st.as_str() {
            "sled" => stores.push("sled"),
            "raft-engine" => stores.push("raft-engine"),
            "both" => stores.extend(["raft-engine", "sled"]),
            other => bail!("--log-store: unknown store {other:?} (raft-engine, sled, both)"),
        }
    }
    stores.dedup();
    let stores_named = !stores.is_empty();
    let mut report = Report::default();

    // The ways each run goes: plain, TLS, or both (the first alternating by run).
    let ways: Vec<Net> = if s.tls == TlsMode::Off {
        vec![Net::plain()]
    } else {
        raise_open_files_limit();
        let t = Instant::now();
        let pki = Arc::new(Pki::create().context("the throwaway CA")?);
        eprintln!("throwaway CA and certificates in {} ({:.1} s)", pki.dir.path().display(), t.elapsed().as_secs_f64());
        match s.tls {
            TlsMode::On => vec![Net::tls(&pki)],
            _ => vec![Net::plain(), Net::tls(&pki)],
        }
    };
    let both = ways.len() > 1;

    // The history for P6, built once through the same commands the log carries.
    let history = if s.restart_jobs > 0 && phase("restart") {
        let t = Instant::now();
        let f = tessera_benches::job_history(s.restart_jobs);
        let bytes = f.state.snapshot();
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("history.snapshot");
        std::fs::write(&path, &bytes)?;
        eprintln!(
            "history of {} jobs: {:.1} MiB snapshot, built in {:.1} s",
            s.restart_jobs,
            bytes.len() as f64 / (1 << 20) as f64,
            t.elapsed().as_secs_f64()
        );
        Some((dir, path, bytes.len() as u64))
    } else {
        None
    };

    // A phase that fails ends the benchmark, and so does SIGINT or SIGTERM (`timeout`), but what
    // was measured before is reported; the processes of the phase cut short are killed.
    let work = async {
        for run in 0..s.runs {
            let mut order: Vec<&Net> = ways.iter().collect();
            if run % 2 == 1 {
                order.reverse();
            }
            for which in ["cluster", "fleet", "depth", "array"] {
                if !phase(which) || (matches!(which, "fleet" | "array") && s.agents == 0) {
                    continue;
                }
                for net in &order {
                    report.suffix = if both && net.pki.is_some() { " (TLS)" } else { "" };
                    if which == "depth" {
                        let mut stores: Vec<Option<&'static str>> = stores.iter().map(|s| Some(*s)).collect();
                        if stores.is_empty() {
                            stores.push(None);
                        }
                        if run % 2 == 1 {
                            stores.reverse();
                        }
                        for store in stores {
                            report.suffix = match (store, stores_named) {
                                (Some("sled"), true) => " (sled)",
                                (Some(_), true) => " (raft-engine)",
                                _ => report.suffix,
                            };
                            report.passes.push(format!("run {run}: depth {} {}", net.name(), store.unwrap_or("")));
                            if let Err(e) = depth_phase(&s, run, net, &mut report, store).await {
                                return Some(e.context(format!("run {run}, depth phase ({})", net.name())));
                            }
                        }
                        continue;
                    }
                    report.passes.push(format!("run {run}: {which} {}", net.name()));
                    let result = match which {
                        "cluster" => cluster_phase(&s, run, net, &mut report).await,
                        "array" => array_phase(&s, run, net, &mut report).await,
                        _ => fleet_phase(&s, run, net, &mut report).await,
                    };
                    if let Err(e) = result {
                        return Some(e.context(format!("run {run}, {which} phase ({})", net.name())));
                    }
                }
            }
            // The restart once per run: over TLS with `--tls on`, plain otherwise.
            report.suffix = "";
            let net = if s.tls == TlsMode::On { ways[0].clone() } else { Net::plain() };
            if let Some((_, path, logical)) = &history
                && let Err(e) = restart_phase(&s, run, &net, &mut report, path, *logical).await
            {
                return Some(e.context(format!("run {run}, restart phase")));
            }
        }
        None
    };
    let failed = tokio::select! {
        failed = work => failed,
        signal = stop_signal() => Some(anyhow::anyhow!("stopped by {signal}")),
    };
    print_report(&s, &report, &args.json)?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
