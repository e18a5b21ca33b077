//! Simulated agents at fleet scale, in the load generator's process: thousands of agent streams
//! multiplexed over a few HTTP/2 connections to the leader ([`Conns::Shared`]), or each over a
//! connection of its own, as real agents do ([`Conns::Own`]: under TLS each with its own agent
//! certificate, since a certificate may register only the node it names). Each registers a node with 8
//! simulated GPUs, sends a heartbeat with 8 GPU samples every second (at its own phase), and
//! answers an assignment with ShardStarted at once, like an agent whose shard starts instantly.
//! A shard runs until it is stopped (answered with ShardExited at once), or, if its job's
//! environment holds `SIM_RUN_MS`, for that long and then exits 0.
//! They measure what the leader does for them: heartbeat handling latency (send to Ack, P4), how
//! fast shards are assigned to them (P2), submit-to-assignment latency (P3), and how long the
//! shards of an agent that is killed or cut off take to be assigned elsewhere (P5).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_proto::v1::server_message::Payload as Out;
use tessera_tls::Security;
use tokio::sync::{Mutex, Notify, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// What the simulated agents saw.
#[derive(Default)]
pub struct FleetStats {
    /// Heartbeat send -> Ack, milliseconds, while `measuring`.
    pub heartbeat_ms: Mutex<Vec<f64>>,
    /// Record heartbeat latencies now.
    pub measuring: AtomicBool,
    /// Assignments received.
    pub assigned: AtomicU64,
    /// Shards that ended (stopped, or ran their `SIM_RUN_MS`).
    pub ended: AtomicU64,
    /// Registered agents.
    pub registered: AtomicU64,
    /// Streams the servers ended (a simulated agent does not reconnect).
    pub streams_lost: AtomicU64,
    /// Job name -> when its submission was sent (P3); the assignment records the latency.
    pub submitted_at: std::sync::Mutex<HashMap<String, Instant>>,
    /// Submission -> assignment of the jobs in `submitted_at`, milliseconds.
    pub assign_ms: std::sync::Mutex<Vec<f64>>,
    /// Job id -> when an attempt after the first was last assigned (P5).
    pub reassigned: std::sync::Mutex<HashMap<u64, Instant>>,
}

/// One simulated agent's handles.
struct AgentHandle {
    task: tokio::task::JoinHandle<()>,
    /// Attempt id -> (job id, runs until stopped) of the shards it runs.
    held: Held,
    /// Stop sending and reading, keeping the stream open (cut off without a FIN).
    stall: Arc<Notify>,
    /// Set when it fails: its timers send nothing more.
    dead: Arc<AtomicBool>,
    /// Its node's name.
    name: String,
    /// Times its stream ended and it reconnected (or tried to).
    lost: Arc<AtomicU64>,
}

type Held = Arc<std::sync::Mutex<HashMap<u64, (u64, bool)>>>;

/// A running simulated fleet; dropping it ends every stream.
pub struct Fleet {
    pub stats: Arc<FleetStats>,
    agents: Vec<AgentHandle>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &self.agents {
            a.task.abort();
        }
    }
}

/// How a simulated agent fails.
#[derive(Debug, Clone, Copy)]
pub enum Failure {
    /// Its process dies: the stream ends at once.
    Killed,
    /// It goes silent with its connection open (no FIN).
    CutOff,
}

impl Fleet {
    /// The agents that hold fewer than `want` shards, each as "name: N shards, M streams lost
    /// (, gone)": who to look for in the servers' logs when a fill falls short.
    pub fn short_of(&self, want: usize) -> Vec<String> {
        self.agents
            .iter()
            .filter_map(|a| {
                let held = a.held.lock().map_or(0, |h| h.len());
                (held < want).then(|| {
                    let gone = if a.task.is_finished() { ", gone" } else { "" };
                    format!("{}: {held} shards, {} streams lost{gone}", a.name, a.lost.load(Ordering::Relaxed))
                })
            })
            .collect()
    }

    /// Fail one agent that runs shards until stopped; returns the job ids of those shards, or
    /// None if no agent runs any.
    pub fn fail_one(&mut self, how: Failure) -> Option<Vec<u64>> {
        let i = self
            .agents
            .iter()
            .enumerate()
            .find(|(_, a)| !a.task.is_finished() && a.held.lock().is_ok_and(|h| h.values().any(|(_, f)| *f)))
            .map(|(i, _)| i)?;
        let a = &self.agents[i];
        a.dead.store(true, Ordering::Relaxed);
        let jobs: Vec<u64> = a.held.lock().ok()?.values().filter(|(_, forever)| *forever).map(|(j, _)| *j).collect();
        match how {
            Failure::Killed => self.agents[i].task.abort(),
            Failure::CutOff => self.agents[i].stall.notify_one(),
        }
        Some(jobs)
    }
}

fn register(name: &str) -> v1::Register {
    v1::Register { agent_version: "loadgen".into(), ..tessera_tests::sim_register(name) }
}

fn heartbeat(now_ms: u64) -> v1::Heartbeat {
    v1::Heartbeat {
        sent_unix_ms: now_ms,
        gpus: (0..8)
            .map(|i| v1::GpuTelemetry {
                gpu_index: i,
                sample_unix_ms: now_ms,
                utilization_percent: Some(90),
                memory_used_mib: Some(70_000),
                memory_total_mib: Some(81_920),
                temperature_c: Some(60),
                power_w: Some(650.0),
                power_limit_w: Some(700.0),
                sm_clock_mhz: Some(1_980),
                ecc_corrected_volatile: Some(0),
                ecc_uncorrected_volatile: Some(0),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// How the simulated agents reach the servers.
pub enum Conns {
    /// This many plain connections to each server, opened at the start and shared by every
    /// agent (their streams multiplexed over them).
    Shared(usize),
    /// Each agent a connection of its own to the server it talks to, opened when it first
    /// does, with its own security (index = agent): TLS with its own agent certificate, or
    /// plain.
    Own(Vec<Security>),
}

/// The servers' addresses, and the connections to every server shared by the simulated agents
/// (none when each has its own).
struct Servers {
    addrs: Vec<String>,
    channels: Vec<Vec<tonic::transport::Channel>>,
}

impl Servers {
    async fn connect(addrs: &[String], conns: usize) -> anyhow::Result<Servers> {
        let mut channels = Vec::new();
        for addr in addrs {
            let mut per = Vec::new();
            for _ in 0..conns.max(1) {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .initial_connection_window_size(Some(16 << 20))
                    .initial_stream_window_size(Some(1 << 20))
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("connect to the server at {addr}"))?;
                per.push(ch);
            }
            channels.push(per);
        }
        Ok(Servers { addrs: addrs.to_vec(), channels })
    }
}

/// One agent's own connection: its security, and its channel to the server it talks to now.
/// Moving to another server (a redirect, a lost leader) drops the channel to the one it left,
/// so an agent holds one connection, as a real agent does: 10,000 agents that each kept one to
/// an old and one to a new leader ran out of file descriptors.
struct Own {
    security: Security,
    current: Option<(usize, tonic::transport::Channel)>,
}

impl Own {
    fn channel(&mut self, addrs: &[String], to: usize) -> Result<tonic::transport::Channel, String> {
        if let Some((at, ch)) = &self.current
            && *at == to
        {
            return Ok(ch.clone());
        }
        self.current = None;
        let ep = self
            .security
            .endpoint(&addrs[to])
            .map_err(|e| format!("endpoint {}: {e}", addrs[to]))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let ch = self.security.connect_lazy(&ep);
        self.current = Some((to, ch.clone()));
        Ok(ch)
    }
}

/// The name of simulated agent `i` of the fleet `prefix` (what its certificate must name).
pub fn agent_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:05}")
}

/// How one session attempt ended.
enum Opened {
    Session(mpsc::Sender<v1::AgentMessage>, Box<tonic::Streaming<v1::ServerMessage>>),
    /// Not the leader; the hinted leader's address, if any.
    Redirect(Option<String>),
    Failed(String),
}

/// Connect `n` agents named [`agent_name`]`(prefix, i)` to the leader at `servers[leader]`
/// the way `conns` says, and return once every one is registered. Like real agents, they
/// reconnect (to the leader a server names, or to each server in turn) when a stream ends.
pub async fn start(servers: &[String], leader: usize, prefix: &str, n: usize, conns: Conns) -> anyhow::Result<Fleet> {
    let (servers, mut own) = match conns {
        Conns::Shared(k) => (Arc::new(Servers::connect(servers, k).await?), None),
        Conns::Own(securities) => {
            anyhow::ensure!(securities.len() == n, "{} securities for {n} agents", securities.len());
            let servers = Arc::new(Servers { addrs: servers.to_vec(), channels: Vec::new() });
            let own = securities.into_iter().map(|security| Own { security, current: None });
            (servers, Some(own))
        }
    };
    let stats = Arc::new(FleetStats::default());
    // Registrations are Raft writes: a bounded number in flight, like a fleet coming up.
    let gate = Arc::new(Semaphore::new(512));
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(n.max(1));
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let (stats, gate, ready, servers) = (stats.clone(), gate.clone(), ready_tx.clone(), servers.clone());
        let held = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let stall = Arc::new(Notify::new());
        let dead = Arc::new(AtomicBool::new(false));
        let name = agent_name(prefix, i);
        let own = own.as_mut().and_then(Iterator::next);
        let lost = Arc::new(AtomicU64::new(0));
        let mut me =
            Agent { i, name: name.clone(), own, stats, held: held.clone(), stall: stall.clone(), dead: dead.clone() };
        let my_lost = lost.clone();
        let task = tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            // A leader change while the fleet registers sends it to the new leader, like the
            // reconnections below.
            let mut target = leader;
            let (tx, inbound) = match me.session(&servers, &mut target).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready.send(Err(anyhow::anyhow!("agent {}: {e}", me.name))).await;
                    return;
                }
            };
            drop(permit);
            me.stats.registered.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send(Ok(())).await;
            me.run(tx, inbound).await;
            loop {
                if me.dead.load(Ordering::Relaxed) {
                    return;
                }
                me.stats.streams_lost.fetch_add(1, Ordering::Relaxed);
                my_lost.fetch_add(1, Ordering::Relaxed);
                let (tx, inbound) = match me.session(&servers, &mut target).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("simulated agent {} gave up reconnecting: {e}", me.name);
                        return;
                    }
                };
                me.run(tx, inbound).await;
            }
        });
        agents.push(AgentHandle { task, held, stall, dead, name, lost });
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => anyhow::bail!("the simulated agents ended before registering"),
        }
    }
    Ok(Fleet { stats, agents })
}

struct Agent {
    i: usize,
    name: String,
    /// Its own connection, or None when it uses the shared ones.
    own: Option<Own>,
    stats: Arc<FleetStats>,
    held: Held,
    stall: Arc<Notify>,
    dead: Arc<AtomicBool>,
}

/// An agent's reports, numbered as it sends them.
#[derive(Clone)]
struct Sender {
    tx: mpsc::Sender<v1::AgentMessage>,
    seq: Arc<AtomicU64>,
}

impl Sender {
    async fn send(&self, payload: In) -> Result<u64, ()> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.tx.send(v1::AgentMessage { seq, payload: Some(payload) }).await.map(|_| seq).map_err(|_| ())
    }
}

fn exited(attempt_id: u64, termination: v1::shard_exited::Termination) -> In {
    In::ShardExited(v1::ShardExited { attempt_id, termination: Some(termination), ..Default::default() })
}

impl Agent {
    /// Open a session with the leader, starting at the server `target`. Like a real agent: try
    /// at once the server a refusal names as the leader, otherwise each server in turn after
    /// 100-200 ms; give up after 600 tries with the last error. `target` ends at the server that
    /// accepted.
    async fn session(
        &mut self,
        servers: &Servers,
        target: &mut usize,
    ) -> Result<(mpsc::Sender<v1::AgentMessage>, tonic::Streaming<v1::ServerMessage>), String> {
        let mut last = String::new();
        for _ in 0..=600 {
            last = match self.open(servers, *target).await {
                Opened::Session(tx, inbound) => return Ok((tx, *inbound)),
                Opened::Redirect(Some(addr)) => {
                    *target =
                        servers.addrs.iter().position(|a| *a == addr).unwrap_or((*target + 1) % servers.addrs.len());
                    last = format!("not the leader (it named {addr})");
                    continue;
                }
                Opened::Redirect(None) => "not the leader (no leader known)".into(),
                Opened::Failed(e) => e,
            };
            *target = (*target + 1) % servers.addrs.len();
            tokio::time::sleep(Duration::from_millis(100 + (self.i as u64 % 100))).await;
        }
        Err(last)
    }

    /// Open a session with the server `to`, registering with the attempts it runs.
    async fn open(&mut self, servers: &Servers, to: usize) -> Opened {
        let ch = match &mut self.own {
            None => servers.channels[to][self.i % servers.channels[to].len()].clone(),
            Some(own) => match own.channel(&servers.addrs, to) {
                Ok(ch) => ch,
                Err(e) => return Opened::Failed(e),
            },
        };
        let running = self
            .held
            .lock()
            .map(|h| {
                h.iter()
                    .map(|(a, (j, _))| v1::RunningAttempt { attempt_id: *a, job_id: *j, ..Default::default() })
                    .collect()
            })
            .unwrap_or_default();
        let reg = v1::Register { running_attempts: running, ..register(&self.name) };
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.send(v1::AgentMessage { seq: 1, payload: Some(In::Register(reg)) }).await;
        let mut client = v1::agent_service_client::AgentServiceClient::new(ch);
        let mut inbound = match client.session(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) => return Opened::Failed(e.to_string()),
        };
        match inbound.message().await {
            Ok(Some(v1::ServerMessage { payload: Some(Out::Registered(_)) })) => Opened::Session(tx, Box::new(inbound)),
            Ok(Some(v1::ServerMessage { payload: Some(Out::NotLeader(n)) })) => {
                Opened::Redirect(n.leader.map(|l| l.leader_address).filter(|a| !a.is_empty()))
            }
            other => Opened::Failed(format!("no Registered: {other:?}")),
        }
    }

    async fn run(&self, tx: mpsc::Sender<v1::AgentMessage>, mut inbound: tonic::Streaming<v1::ServerMessage>) {
        let out = Sender { tx, seq: Arc::new(AtomicU64::new(2)) };
        // Heartbeats spread over the second, as a fleet's are.
        let phase = Duration::from_millis((self.i as u64 * 7919) % 1000);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
        let mut sent: std::collections::VecDeque<(u64, Instant)> = std::collections::VecDeque::new();
        loop {
            tokio::select! {
                _ = self.stall.notified() => {
                    // Silent, stream open: only the servers' node-down timeout notices.
                    std::future::pending::<()>().await;
                }
                _ = tick.tick() => {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let at = Instant::now();
                    let Ok(seq) = out.send(In::Heartbeat(heartbeat(now_ms))).await else { return };
                    sent.push_back((seq, at));
                    if sent.len() > 8 {
                        sent.pop_front();
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(v1::ServerMessage { payload: Some(Out::Ack(a)) })) => {
                        if let Some(pos) = sent.iter().position(|(s, _)| *s == a.seq) {
                            let (_, at) = sent.remove(pos).unwrap_or((0, Instant::now()));
                            if self.stats.measuring.load(Ordering::Relaxed) {
                                self.stats.heartbeat_ms.lock().await.push(at.elapsed().as_secs_f64() * 1000.0);
                            }
                        }
                    }
                    Ok(Some(v1::ServerMessage { payload: Some(Out::AssignShard(a)) })) => {
                        if self.assigned(&a, &out).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(v1::ServerMessage { payload: Some(Out::StopShard(s)) })) => {
                        let was_held = self.held.lock().ok().and_then(|mut h| h.remove(&s.attempt_id)).is_some();
                        if was_held {
                            self.stats.ended.fetch_add(1, Ordering::Relaxed);
                        }
                        let end = v1::shard_exited::Termination::Signal(15);
                        if out.send(exited(s.attempt_id, end)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(v1::ServerMessage { payload: Some(Out::ForgetAttempts(f)) })) => {
                        if let Ok(mut h) = self.held.lock() {
                            for a in f.attempt_ids {
                                h.remove(&a);
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                },
            }
        }
    }

    async fn assigned(&self, a: &v1::AssignShard, out: &Sender) -> Result<(), ()> {
        let now = Instant::now();
        let run_ms = a.env.get("SIM_RUN_MS").and_then(|v| v.parse::<u64>().ok());
        let new = self.held.lock().is_ok_and(|mut h| h.insert(a.attempt_id, (a.job_id, run_ms.is_none())).is_none());
        if !new {
            // Sent again after a reconnect: it runs already.
            return Ok(());
        }
        self.stats.assigned.fetch_add(1, Ordering::Relaxed);
        if a.attempt > 1
            && let Ok(mut r) = self.stats.reassigned.lock()
        {
            r.insert(a.job_id, now);
        }
        let sent_at = self.stats.submitted_at.lock().ok().and_then(|mut m| m.remove(&a.job_name));
        if let Some(t) = sent_at
            && let Ok(mut v) = self.stats.assign_ms.lock()
        {
            v.push(now.duration_since(t).as_secs_f64() * 1000.0);
        }
        out.send(In::ShardStarted(v1::ShardStarted { attempt_id: a.attempt_id, ..Default::default() })).await?;
        if let Some(ms) = run_ms {
            let (out, held, stats, attempt) = (out.clone(), self.held.clone(), self.stats.clone(), a.attempt_id);
            let dead = self.dead.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if dead.load(Ordering::Relaxed) {
                    return;
                }
                if held.lock().ok().and_then(|mut h| h.remove(&attempt)).is_some() {
                    stats.ended.fetch_add(1, Ordering::Relaxed);
                    let _ = out.send(exited(attempt, v1::shard_exited::Termination::ExitCode(0))).await;
                }
            });
        }
        Ok(())
    }
}

/// CPU seconds (user + system) and peak RSS (MiB) of a process, from /proc.
pub fn cpu_and_peak_rss(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(") ")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    // /proc reports in USER_HZ, which is 100 on Linux.
    Some((ticks / 100.0, hwm_kib / 1024.0))
}
