//! `tessera dev`: a whole cluster in one process on loopback, like `nomad agent -dev`.
//!
//! Three Raft servers and three agents with simulated GPUs (two on "aws", one on "azure"; the
//! cloud is set directly, no metadata service is asked) run in this process on 127.0.0.1, on
//! ports 7001-7003 (where the CLI looks by default) when they are free, else on ports the
//! kernel picks. Data goes to a temporary directory, removed on exit, unless
//! `--data-dir` is given; a cluster kept that way restarts on the same ports. The servers run
//! with the real defaults (heartbeat, fence and node-down timeouts): what you see is what a real
//! cluster does.
//!
//! Each agent runs on a runtime and thread of its own, so that killing one (the `--demo`) drops
//! every task it has, as a host that dies loses every process: its shards' process groups get
//! SIGKILL and its stream to the leader breaks.
//!
//! `--demo` then runs a gang job through the loss of a node: see [`demo`].

mod api;
mod demo;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_proto::v1;
use tokio::sync::{mpsc, oneshot, watch};

use api::Api;

/// Flags of `tessera dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Keep the servers' and agents' data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Submit a gang job running the example trainer, kill one agent half way, show the shard
    /// resume from its checkpoint on another node, and exit 0 when the job succeeds.
    #[arg(long)]
    pub demo: bool,
}

/// The example trainer, written into the data directory for the demo and for users to submit.
const TRAINER: &str = include_str!("../../../examples/trainer.py");
/// GPUs of every simulated node.
const GPUS: &str = "8xH100-80GB";
/// How long the cluster may take to elect a leader and register its nodes.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the servers get to stop once asked.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Remembers the servers' addresses in a kept data directory, so a restart uses them again.
const PORTS_FILE: &str = "dev-cluster.json";

/// One simulated GPU host.
struct NodePlan {
    name: &'static str,
    cloud: v1::Cloud,
    region: &'static str,
    zone: &'static str,
    instance_type: &'static str,
}

/// Price per GPU-hour of every dev node, micro-dollars: about the on-demand list price of one
/// GPU of a p5.48xlarge or a Standard_ND96isr_H100_v5 (near $98 an hour for eight). The same on
/// every node, so price never changes the demo's placements; `tessera usage` shows the cost.
const DEV_PRICE_MICROS: u64 = 12_290_000;

/// Two AWS hosts in one region (different zones) and one Azure host: a gang of two whole-node
/// shards fits in AWS, and after losing an AWS host it needs Azure too.
const NODES: [NodePlan; 3] = [
    NodePlan {
        name: "aws-1",
        cloud: v1::Cloud::Aws,
        region: "us-east-1",
        zone: "us-east-1a",
        instance_type: "p5.48xlarge",
    },
    NodePlan {
        name: "aws-2",
        cloud: v1::Cloud::Aws,
        region: "us-east-1",
        zone: "us-east-1b",
        instance_type: "p5.48xlarge",
    },
    NodePlan {
        name: "azure-1",
        cloud: v1::Cloud::Azure,
        region: "eastus",
        zone: "eastus-1",
        instance_type: "Standard_ND96isr_H100_v5",
    },
];

/// Run `tessera dev`.
pub fn run(args: DevArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run_async(args))
}

async fn run_async(args: DevArgs) -> ExitCode {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot listen for Ctrl-C and SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    let data = match DataDir::open(args.data_dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let (cluster, mut exits) = match Cluster::start(data.path()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = tokio::select! {
        r = work(&cluster, &data, args.demo) => match r {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e),
        },
        e = exits.unexpected(&cluster.agents) => Outcome::Failed(e),
        _ = signals.recv() => Outcome::Interrupted,
    };
    match &outcome {
        Outcome::Done if args.demo => println!("\nThe demo is over; stopping the cluster."),
        Outcome::Done => {}
        Outcome::Interrupted if args.demo => println!("\nInterrupted: the demo did not finish. Stopping the cluster."),
        Outcome::Interrupted => println!(
            "\nStopping: every agent asks its shards to checkpoint and stop (Ctrl-C again to kill them at \
             once), then the servers stop."
        ),
        Outcome::Failed(_) => println!("\nStopping the cluster."),
    }
    let stopped = cluster.shutdown(&mut exits, &mut signals).await;
    let data_note = match &data {
        DataDir::Kept(p) => format!(" Its data is kept in {}.", p.display()),
        DataDir::Temp(_) => String::new(),
    };
    drop(data);
    match (outcome, stopped) {
        (Outcome::Failed(e), _) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        (_, Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        (Outcome::Interrupted, Ok(())) if args.demo => ExitCode::from(1),
        (_, Ok(())) => {
            println!("The cluster has stopped.{data_note}");
            ExitCode::SUCCESS
        }
    }
}

enum Outcome {
    Done,
    Interrupted,
    Failed(String),
}

/// Wait for the cluster, say how to use it, then run the demo or wait for a signal.
async fn work(cluster: &Cluster, data: &DataDir, demo: bool) -> Result<(), String> {
    let (leader, nodes) = cluster.wait_ready().await?;
    let trainer = data.path().join("trainer.py");
    std::fs::write(&trainer, TRAINER).map_err(|e| format!("cannot write {}: {e}", trainer.display()))?;
    print_banner(cluster, data, leader, &nodes, &trainer, demo);
    if demo {
        demo::run(&cluster.api, &cluster.agents, data.path(), &trainer).await
    } else {
        std::future::pending().await
    }
}

fn print_banner(cluster: &Cluster, data: &DataDir, leader: u64, nodes: &[v1::Node], trainer: &Path, demo: bool) {
    let what = match data {
        DataDir::Temp(_) => "removed on exit; keep it with --data-dir",
        DataDir::Kept(_) => "kept",
    };
    println!("Tessera dev cluster: 3 servers and 3 agents with simulated GPUs, all in this process.");
    println!("Data: {} ({what})", data.path().display());
    println!();
    println!("Servers:");
    for (id, addr) in &cluster.servers {
        println!("  server {id}  {addr}{}", if *id == leader { "  (leader)" } else { "" });
    }
    println!("Nodes:");
    let width = nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    for n in nodes {
        let model = n.gpus.first().map(|g| g.model.as_str()).unwrap_or("no GPU");
        let metrics = cluster
            .agents
            .iter()
            .find(|a| a.name == n.name)
            .and_then(|a| a.http)
            .map(|h| format!("  metrics http://{h}/metrics"))
            .unwrap_or_default();
        println!(
            "  {:width$}  {:5}  {:9}  {:10}  {} x {model}{metrics}",
            n.name,
            api::cloud_name(n.cloud),
            n.region,
            n.zone,
            n.gpus.len(),
        );
    }
    let addrs = cluster.servers.values().cloned().collect::<Vec<_>>().join(",");
    let certs = data.path().join("certs");
    println!();
    println!("Point the CLI at it (mutual TLS, a throwaway CA and an admin certificate in {}):", certs.display());
    println!("  export TESSERA_SERVER={addrs}");
    println!(
        "  export TESSERA_CA={} TESSERA_CERT={} TESSERA_KEY={}",
        certs.join("ca.pem").display(),
        certs.join("user-admin.pem").display(),
        certs.join("user-admin-key.pem").display()
    );
    println!(
        "  tessera job submit --shards 2 --gpus 1 -- python3 {} --steps 200 --step-seconds 0.1",
        trainer.display()
    );
    println!("  tessera job list; tessera node list; tessera cluster status");
    println!("or Python (pip install ./clients/python):");
    println!(
        "  python3 clients/python/examples/submit_and_watch.py --servers $TESSERA_SERVER --ca $TESSERA_CA \\\n    \
         --cert $TESSERA_CERT --key $TESSERA_KEY -- python3 -c 'print(\"hello\")'"
    );
    if let Some(first) = cluster.servers.values().next() {
        println!("or any gRPC client (reflection is on):");
        println!(
            "  grpcurl -cacert $TESSERA_CA -cert $TESSERA_CERT -key $TESSERA_KEY {first} tessera.v1.ClusterService/Status"
        );
    }
    if let Some(h) = cluster.agents.first().and_then(|a| a.http) {
        println!("Simulated GPUs take faults for testing: curl '{h}/simulate/xid?gpu=0&xid=79'");
    }
    let token = std::fs::read_to_string(certs.join(UI_TOKEN_FILE)).unwrap_or_default();
    if let Some(ui) = cluster.ui.get(&leader).or_else(|| cluster.ui.values().next()) {
        println!("Web dashboard (the browser will not know the throwaway CA; its admin token signs you in):");
        println!("  https://{ui}/ui/login?token={}", token.trim());
    }
    println!();
    if !demo {
        println!("Press Ctrl-C to stop.");
    }
}

/// Where the cluster keeps its data.
enum DataDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl DataDir {
    fn open(given: Option<PathBuf>) -> Result<DataDir, String> {
        match given {
            Some(p) => {
                let p = std::path::absolute(&p).map_err(|e| format!("--data-dir {}: {e}", p.display()))?;
                std::fs::create_dir_all(&p).map_err(|e| format!("--data-dir {}: {e}", p.display()))?;
                Ok(DataDir::Kept(p))
            }
            None => tempfile::Builder::new()
                .prefix("tessera-dev-")
                .tempdir()
                .map(DataDir::Temp)
                .map_err(|e| format!("cannot create a temporary directory: {e}")),
        }
    }

    fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Kept(p) => p,
        }
    }
}

/// Ctrl-C and SIGTERM.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// One agent of the dev cluster, and the means to kill it.
pub(crate) struct AgentCtl {
    /// Node name.
    pub name: String,
    /// Where its attempts get their working directories.
    pub work_dir: PathBuf,
    /// Its metrics endpoint.
    pub http: Option<SocketAddr>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    dead: Mutex<Option<oneshot::Receiver<()>>>,
    killed: AtomicBool,
}

impl AgentCtl {
    /// Kill the agent as if its host died: drop its runtime, and with it every task it has. Its
    /// shards are dropped, which kills their process groups with SIGKILL, and its stream to the
    /// leader breaks. Returns once all that is done.
    pub async fn kill(&self) -> Result<(), String> {
        self.killed.store(true, Ordering::SeqCst);
        let kill = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = kill {
            let _ = tx.send(());
        }
        let dead = self.dead.lock().unwrap_or_else(|p| p.into_inner()).take();
        match dead {
            Some(rx) => match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(_) => Ok(()),
                Err(_) => Err(format!("agent {} did not stop within 10 s of being killed", self.name)),
            },
            None => Ok(()),
        }
    }

    fn was_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// Who stopped.
enum Who {
    Server(u64),
    Agent(String),
}

/// A server or agent that stopped; `Ok(true)` when an agent was killed on purpose.
struct Exit {
    who: Who,
    result: Result<bool, String>,
}

/// The servers and agents still running, as their exits arrive.
struct Exits {
    rx: mpsc::UnboundedReceiver<Exit>,
    servers: BTreeSet<u64>,
    agents: BTreeSet<String>,
}

impl Exits {
    fn note(&mut self, e: &Exit) {
        match &e.who {
            Who::Server(id) => {
                self.servers.remove(id);
            }
            Who::Agent(name) => {
                self.agents.remove(name);
            }
        }
    }

    /// The first server or agent that stops without being asked to.
    async fn unexpected(&mut self, agents: &[AgentCtl]) -> String {
        loop {
            let Some(e) = self.rx.recv().await else { return std::future::pending().await };
            self.note(&e);
            let why = match e.result {
                Ok(true) => continue,
                Ok(false) => "stopped".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            match e.who {
                Who::Agent(name) if agents.iter().any(|a| a.name == name && a.was_killed()) => continue,
                Who::Agent(name) => return format!("agent {name} {why}"),
                Who::Server(id) => return format!("server {id} {why}"),
            }
        }
    }
}

/// The dev cluster's processes (tasks and threads of this one).
struct Cluster {
    /// Server id -> gRPC address.
    servers: BTreeMap<u64, String>,
    /// Server id -> web dashboard address.
    ui: BTreeMap<u64, SocketAddr>,
    agents: Vec<AgentCtl>,
    stop_servers: watch::Sender<bool>,
    stop_agents: watch::Sender<bool>,
    api: Api,
}

impl Cluster {
    async fn start(data: &Path) -> Result<(Cluster, Exits), String> {
        let listeners = bind_servers(data).await?;
        let servers: BTreeMap<u64, String> =
            listeners.iter().map(|(id, l)| (*id, l.1.to_string())).collect::<BTreeMap<_, _>>();
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        let (stop_servers, _) = watch::channel(false);
        let (stop_agents, _) = watch::channel(false);
        let mut exits = Exits { rx: exit_rx, servers: BTreeSet::new(), agents: BTreeSet::new() };
        let certs = dev_certs(&data.join("certs"))?;
        let mut ui = BTreeMap::new();
        for (id, (listener, addr)) in listeners {
            let mut cfg = tessera_server::ServerConfig::new(id, addr, data.join(format!("server-{id}")));
            cfg.initial_cluster = servers.clone();
            let files = tessera_tls::TlsFiles::in_dir(&certs, &format!("server-{id}"));
            (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) = (Some(files.ca), Some(files.cert), Some(files.key));
            // The dashboard, signed into with the dev admin token (ACLs bootstrapped with it).
            cfg.acl_bootstrap_token_file = Some(certs.join(UI_TOKEN_FILE));
            let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).ok();
            cfg.ui = port;
            if let Some(p) = port {
                ui.insert(id, p);
            }
            cfg.validate().map_err(|e| format!("server {id}: {e}"))?;
            let mut stop = stop_servers.subscribe();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let tx = exit_tx.clone();
            tokio::spawn(async move {
                // In a task of its own, so that a panic is reported too.
                let result = match tokio::spawn(tessera_server::run(cfg, listener, shutdown)).await {
                    Ok(r) => r.map(|()| false).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("it crashed: {e}")),
                };
                let _ = tx.send(Exit { who: Who::Server(id), result });
            });
            exits.servers.insert(id);
        }
        let addrs: Vec<String> = servers.values().cloned().collect();
        let mut agents = Vec::new();
        for plan in &NODES {
            let work_dir = data.join(format!("agent-{}", plan.name));
            // A port for its metrics: taken from the kernel, then handed to the agent to bind.
            let http = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).ok();
            let cfg = tessera_agent::agent::AgentConfig {
                name: plan.name.to_string(),
                servers: addrs.clone(),
                advertise: "127.0.0.1".into(),
                cloud: plan.cloud,
                region: plan.region.into(),
                zone: plan.zone.into(),
                instance_type: plan.instance_type.into(),
                spot: false,
                price_micros: DEV_PRICE_MICROS,
                labels: BTreeMap::new(),
                work_dir: work_dir.clone(),
                log_cap_bytes: 64 * 1024 * 1024,
                log_retention: std::time::Duration::from_secs(7 * 86_400),
                rendezvous_ports: None,
                security: load_tls(&certs, &format!("agent-{}", plan.name))?,
                checkpoint_stores: tessera_agent::checkpoint::Stores::default(),
                checkpoint_keep: 3,
            };
            let (kill_tx, kill_rx) = oneshot::channel();
            let (dead_tx, dead_rx) = oneshot::channel();
            spawn_agent(cfg, http, stop_agents.subscribe(), kill_rx, dead_tx, exit_tx.clone())
                .map_err(|e| format!("cannot start a thread for agent {}: {e}", plan.name))?;
            exits.agents.insert(plan.name.to_string());
            agents.push(AgentCtl {
                name: plan.name.to_string(),
                work_dir,
                http,
                kill: Mutex::new(Some(kill_tx)),
                dead: Mutex::new(Some(dead_rx)),
                killed: AtomicBool::new(false),
            });
        }
        let api = Api::new(&addrs, &load_tls(&certs, "user-admin")?)?;
        Ok((Cluster { servers, ui, agents, stop_servers, stop_agents, api }, exits))
    }

    /// Wait until the servers have a leader and every node is registered and ready.
    async fn wait_ready(&self) -> Result<(u64, Vec<v1::Node>), String> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut last: String;
        loop {
            match self.api.status().await {
                Ok(s) => match s.leader_id {
                    Some(leader) => match self.api.nodes().await {
                        Ok(nodes) => {
                            let ready: Vec<v1::Node> = NODES
                                .iter()
                                .filter_map(|p| {
                                    nodes.iter().find(|n| n.name == p.name && n.state == v1::NodeState::Ready as i32)
                                })
                                .cloned()
                                .collect();
                            if ready.len() == NODES.len() {
                                return Ok((leader, ready));
                            }
                            last = format!("{} of {} nodes registered and ready", ready.len(), NODES.len());
                        }
                        Err(e) => last = e,
                    },
                    None => last = "the servers have not elected a leader yet".into(),
                },
                Err(e) => last = e,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("the cluster did not come up within {} s: {last}", START_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop the agents (they stop their shards; a second signal kills them), then the servers.
    async fn shutdown(&self, exits: &mut Exits, signals: &mut Signals) -> Result<(), String> {
        let _ = self.stop_agents.send(true);
        let mut problems = Vec::new();
        let mut forced = false;
        // Once killed, agents are gone within moments; this only guards against a stuck one.
        let mut give_up = std::pin::pin!(tokio::time::sleep(Duration::from_secs(365 * 86_400)));
        while !exits.agents.is_empty() {
            tokio::select! {
                _ = &mut give_up => {
                    problems.push(format!("agents {:?} did not stop", exits.agents));
                    break;
                }
                e = exits.rx.recv() => match e {
                    Some(e) => {
                        exits.note(&e);
                        if let (Who::Agent(name), Err(why)) = (&e.who, &e.result) {
                            problems.push(format!("agent {name}: {why}"));
                        }
                    }
                    None => break,
                },
                _ = signals.recv(), if !forced => {
                    forced = true;
                    give_up.as_mut().reset(tokio::time::Instant::now() + SERVER_STOP_TIMEOUT);
                    println!("Killing every agent and its shards now.");
                    for a in &self.agents {
                        a.killed.store(true, Ordering::SeqCst);
                        if let Some(tx) = a.kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        }
        let _ = self.stop_servers.send(true);
        let servers = async {
            while !exits.servers.is_empty() {
                match exits.rx.recv().await {
                    Some(e) => {
                        exits.note(&e);
                        if let (Who::Server(id), Err(why)) = (&e.who, &e.result) {
                            problems.push(format!("server {id}: {why}"));
                        }
                    }
                    None => break,
                }
            }
        };
        if tokio::time::timeout(SERVER_STOP_TIMEOUT, servers).await.is_err() {
            problems.push(format!(
                "servers {:?} did not stop within {} s",
                exits.servers,
                SERVER_STOP_TIMEOUT.as_secs()
            ));
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

/// The dev cluster's throwaway CA and certificates, in `dir` (made on first start, reused
/// with a kept --data-dir): one per server (127.0.0.1 and localhost), one per agent, and an
/// admin user's for the CLI.
fn dev_certs(dir: &Path) -> Result<PathBuf, String> {
    use tessera_core::acl::{Principal, Role};
    use tessera_tls::issue::{Ca, write_pair};
    let token = dir.join(UI_TOKEN_FILE);
    if !token.exists() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        write_secret(&token, &secret)?;
    }
    if dir.join("user-admin.pem").exists() {
        return Ok(dir.to_path_buf());
    }
    let (ca, files) = Ca::create("Tessera dev CA (throwaway)", 30).map_err(|e| e.to_string())?;
    write_pair(dir, "ca", &files).map_err(|e| e.to_string())?;
    let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let mut wanted: Vec<(Principal, String, Vec<String>)> =
        (1..=3).map(|id| (Principal::Server { id }, format!("server-{id}"), hosts.clone())).collect();
    for n in &NODES {
        wanted.push((Principal::Agent { node: n.name.to_string() }, format!("agent-{}", n.name), Vec::new()));
    }
    let admin =
        Principal::User { name: "admin".into(), role: Some(Role::Admin), tenants: Default::default(), token: None };
    wanted.push((admin, "user-admin".into(), Vec::new()));
    for (who, stem, hosts) in wanted {
        let issued = ca.issue(&who, &hosts, 30).map_err(|e| e.to_string())?;
        write_pair(dir, &stem, &issued).map_err(|e| e.to_string())?;
    }
    Ok(dir.to_path_buf())
}

/// The dev admin token's secret, for the dashboard (ACLs are bootstrapped with it).
const UI_TOKEN_FILE: &str = "admin-token";

fn write_secret(path: &Path, secret: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(secret.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_tls(dir: &Path, stem: &str) -> Result<tessera_tls::Security, String> {
    tessera_tls::Tls::load(tessera_tls::TlsFiles::in_dir(dir, stem))
        .map(tessera_tls::Security::Tls)
        .map_err(|e| e.to_string())
}

/// Listeners for the three servers: 127.0.0.1:7001-7003 (the CLI's default) when free, else
/// ports the kernel picks; in a data directory that holds a cluster already, the ports that
/// cluster was created with (they are in its membership).
async fn bind_servers(data: &Path) -> Result<BTreeMap<u64, (tokio::net::TcpListener, SocketAddr)>, String> {
    let ports_file = data.join(PORTS_FILE);
    let existing = (1..=3).any(|id| data.join(format!("server-{id}")).exists());
    let wanted: BTreeMap<u64, SocketAddr> = if existing {
        let text = std::fs::read_to_string(&ports_file).map_err(|e| {
            format!(
                "{} holds servers' data but {} cannot be read ({e}); use an empty --data-dir",
                data.display(),
                ports_file.display()
            )
        })?;
        parse_ports(&text).map_err(|e| format!("{}: {e}", ports_file.display()))?
    } else {
        // The CLI's default servers, so that `tessera job ...` needs no flags, when all three
        // ports are free; else ports the kernel picks (the banner prints them).
        let mut defaults = BTreeMap::new();
        for id in 1..=3u16 {
            let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + id));
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    defaults.insert(u64::from(id), (l, addr));
                }
                Err(_) => break,
            }
        }
        if defaults.len() == 3 {
            write_ports(&ports_file, &defaults)?;
            return Ok(defaults);
        }
        drop(defaults);
        (1..=3).map(|id| (id, SocketAddr::from(([127, 0, 0, 1], 0)))).collect()
    };
    let mut out = BTreeMap::new();
    for (id, addr) in wanted {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            if existing {
                format!(
                    "cannot listen on {addr}, where server {id} of the cluster in {} was created: {e}; stop \
                     whatever uses that port, or use another --data-dir",
                    data.display()
                )
            } else {
                format!("cannot listen on {addr}: {e}")
            }
        })?;
        let local = listener.local_addr().map_err(|e| format!("cannot read a listener's address: {e}"))?;
        out.insert(id, (listener, local));
    }
    if !existing {
        write_ports(&ports_file, &out)?;
    }
    Ok(out)
}

/// Remember the servers' ports in the data directory, for a restart on the same ones.
fn write_ports(
    ports_file: &Path,
    servers: &BTreeMap<u64, (tokio::net::TcpListener, SocketAddr)>,
) -> Result<(), String> {
    let ports: serde_json::Map<String, serde_json::Value> =
        servers.iter().map(|(id, (_, a))| (id.to_string(), serde_json::Value::String(a.to_string()))).collect();
    let text = serde_json::json!({ "servers": ports }).to_string();
    std::fs::write(ports_file, text).map_err(|e| format!("cannot write {}: {e}", ports_file.display()))
}

fn parse_ports(text: &str) -> Result<BTreeMap<u64, SocketAddr>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let servers = v.get("servers").and_then(|s| s.as_object()).ok_or("no \"servers\" object")?;
    let mut out = BTreeMap::new();
    for (id, addr) in servers {
        let id: u64 = id.parse().map_err(|_| format!("'{id}' is not a server id"))?;
        let addr = addr
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| format!("server {id}: {addr} is not HOST:PORT"))?;
        out.insert(id, addr);
    }
    if out.keys().copied().collect::<Vec<_>>() != [1, 2, 3] {
        return Err("expected servers 1, 2 and 3".into());
    }
    Ok(out)
}

/// Run one agent on a thread and runtime of its own until it is stopped (`stop`: it stops its
/// shards) or killed (`kill`: its runtime is dropped with everything on it).
fn spawn_agent(
    cfg: tessera_agent::agent::AgentConfig,
    http: Option<SocketAddr>,
    mut stop: watch::Receiver<bool>,
    kill: oneshot::Receiver<()>,
    dead: oneshot::Sender<()>,
    exits: mpsc::UnboundedSender<Exit>,
) -> std::io::Result<()> {
    let name = cfg.name.clone();
    std::thread::Builder::new().name(format!("agent-{name}")).spawn(move || {
        let thread_name = format!("agent-{name}-rt");
        // The agent needs a multi-threaded runtime (it uses block_in_place); one worker is enough.
        let run = std::panic::AssertUnwindSafe(move || {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(thread_name)
                .enable_all()
                .build()
            {
                Err(e) => Err(format!("cannot start its async runtime: {e}")),
                Ok(rt) => {
                    let opts = tessera_agent::CloudOptions {
                        kind: tessera_agent::cloud::CloudKind::None,
                        endpoint: None,
                        poll: Duration::from_secs(1),
                    };
                    let shutdown = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    let ended = rt.block_on(async {
                        tokio::select! {
                            r = tessera_agent::run(cfg, Some(GPUS.to_string()), http, opts, shutdown) => Some(r),
                            _ = kill => None,
                        }
                    });
                    // Dropping the runtime drops every task on it: the agent's session, its shards'
                    // supervisors and waiters. The last reference to each running shard goes with
                    // them, and a shard dropped while running kills its process group (SIGKILL).
                    drop(rt);
                    match ended {
                        Some(Ok(())) => Ok(false),
                        Some(Err(e)) => Err(e.to_string()),
                        None => Ok(true),
                    }
                }
            }
        });
        let result = std::panic::catch_unwind(run).unwrap_or_else(|_| Err("it crashed (see the log above)".into()));
        let _ = dead.send(());
        let _ = exits.send(Exit { who: Who::Agent(name), result });
    })?;
    Ok(())
}
