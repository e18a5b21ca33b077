//! Simulated agents at fleet scale, in the load generator's process: thousands of agent streams
//! multiplexed over a few HTTP/2 connections to the leader. Each registers a node with 8
//! simulated GPUs, sends a heartbeat with 8 GPU samples every second (at its own phase), and
//! answers an assignment with ShardStarted at once, like an agent whose shard starts instantly.
//! They measure what the leader does for them: heartbeat handling latency (send to Ack, P4) and
//! how fast shards are assigned to them (P2).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_proto::v1::server_message::Payload as Out;
use tokio::sync::{Mutex, Semaphore, mpsc};
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
    /// Registered agents.
    pub registered: AtomicU64,
}

/// A running simulated fleet; dropping it ends every stream.
pub struct Fleet {
    pub stats: Arc<FleetStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
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

/// Connect `n` agents named `{prefix}-{i}` to the leader at `leader` over `conns` connections,
/// and return once every one is registered.
pub async fn start(leader: &str, prefix: &str, n: usize, conns: usize) -> anyhow::Result<Fleet> {
    let mut channels = Vec::new();
    for _ in 0..conns.max(1) {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{leader}"))?
            .initial_connection_window_size(Some(16 << 20))
            .initial_stream_window_size(Some(1 << 20))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to the leader at {leader}"))?;
        channels.push(ch);
    }
    let stats = Arc::new(FleetStats::default());
    // Registrations are Raft writes: a bounded number in flight, like a fleet coming up.
    let gate = Arc::new(Semaphore::new(512));
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(n.max(1));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let ch = channels[i % channels.len()].clone();
        let (stats, gate, ready) = (stats.clone(), gate.clone(), ready_tx.clone());
        let name = format!("{prefix}-{i:05}");
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let (tx, rx) = mpsc::channel(64);
            let _ = tx.send(v1::AgentMessage { seq: 1, payload: Some(In::Register(register(&name))) }).await;
            let mut client = v1::agent_service_client::AgentServiceClient::new(ch);
            let mut inbound = match client.session(ReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    let _ = ready.send(Err(anyhow::anyhow!("agent {name}: {e}"))).await;
                    return;
                }
            };
            match inbound.message().await {
                Ok(Some(v1::ServerMessage { payload: Some(Out::Registered(_)) })) => {}
                other => {
                    let _ = ready.send(Err(anyhow::anyhow!("agent {name}: no Registered: {other:?}"))).await;
                    return;
                }
            }
            drop(permit);
            stats.registered.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send(Ok(())).await;
            run_agent(i, tx, inbound, stats).await;
        }));
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => anyhow::bail!("the simulated agents ended before registering"),
        }
    }
    Ok(Fleet { stats, tasks })
}

async fn run_agent(
    i: usize,
    tx: mpsc::Sender<v1::AgentMessage>,
    mut inbound: tonic::Streaming<v1::ServerMessage>,
    stats: Arc<FleetStats>,
) {
    let mut seq = 1u64;
    // Heartbeats spread over the second, as a fleet's are.
    let phase = Duration::from_millis((i as u64 * 7919) % 1000);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
    let mut sent: std::collections::VecDeque<(u64, Instant)> = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                sent.push_back((seq, Instant::now()));
                if sent.len() > 8 {
                    sent.pop_front();
                }
                if tx.send(v1::AgentMessage { seq, payload: Some(In::Heartbeat(heartbeat(now_ms))) }).await.is_err() {
                    return;
                }
            }
            m = inbound.message() => match m {
                Ok(Some(v1::ServerMessage { payload: Some(Out::Ack(a)) })) => {
                    if let Some(pos) = sent.iter().position(|(s, _)| *s == a.seq) {
                        let (_, at) = sent.remove(pos).unwrap_or((0, Instant::now()));
                        if stats.measuring.load(Ordering::Relaxed) {
                            stats.heartbeat_ms.lock().await.push(at.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                }
                Ok(Some(v1::ServerMessage { payload: Some(Out::AssignShard(a)) })) => {
                    stats.assigned.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                    let started = v1::ShardStarted { attempt_id: a.attempt_id, ..Default::default() };
                    if tx.send(v1::AgentMessage { seq, payload: Some(In::ShardStarted(started)) }).await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
        }
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
