//! The agent's main loop: one stream to the leader, reconnecting with backoff and following
//! leader hints; shards keep running through short outages, and are stopped when no message
//! has been acknowledged for the fence timeout (self-fencing), so a cut-off shard never runs
//! twice. Reports (starts, exits, checkpoints, GPU health) are kept until acknowledged and sent
//! again after a reconnect.
//!
//! The rules of all that live in [`crate::protocol`], a pure state machine; this module is its
//! IO: it feeds it what happens (messages, exits, time) and performs the actions it returns
//! (sends, starts, stops, kills, waits).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_proto::v1::server_message::Payload as Out;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::checkpoint::{Remote, Stores, Target, UploadEvent, Uploader};
use crate::gpu::{GpuEventKind, GpuSource};
use crate::protocol::{Action, Protocol, SessionEnd};
use crate::shard::{ExitInfo, LaunchMode, LaunchSpec, Shard};

/// Most output sent per attempt stream and heartbeat.
const LOG_TICK_BYTES: u64 = 256 * 1024;
/// Most output sent per attempt stream when it exits.
const LOG_FINAL_BYTES: u64 = 1024 * 1024;
/// Output resent to a new leader, per attempt stream.
const LOG_RESEND_BYTES: u64 = 1024 * 1024;
/// How often the agent looks for output past its retention.
const LOG_SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Attempts whose checkpoints the agent still prunes as the servers accept newer ones.
const PRUNABLE_KEPT: usize = 256;
/// Most output sent in one answer to ReadLog.
const LOG_READ_MAX_BYTES: u64 = 1024 * 1024;

/// New output of an attempt since `offsets`, as log chunks of at most `max` bytes per stream.
fn log_chunks(attempt: u64, shard: &Shard, offsets: &mut [u64; 2], max: u64) -> Vec<In> {
    let mut out = Vec::new();
    for (i, stream) in [v1::LogStream::Stdout, v1::LogStream::Stderr].into_iter().enumerate() {
        // Output rotated away before it was sent is skipped: the chunk's offset shows the gap.
        let (offset, data) = shard.stream(stream as i32).read(offsets[i], max);
        if data.is_empty() {
            continue;
        }
        offsets[i] = offset.saturating_add(data.len() as u64);
        out.push(In::LogChunk(v1::LogChunk { attempt_id: attempt, stream: stream as i32, offset, data }));
    }
    out
}

/// What the agent says about its host, and where the servers are.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Host name, unique in the fleet.
    pub name: String,
    /// Scheduler servers, tried in turn.
    pub servers: Vec<String>,
    /// Address other hosts reach this one at (MASTER_ADDR of the jobs it leads).
    pub advertise: String,
    /// Cloud, region, zone, instance type, spot, price per GPU-hour in micro-dollars.
    pub cloud: v1::Cloud,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Instance type.
    pub instance_type: String,
    /// Spot capacity.
    pub spot: bool,
    /// Price per GPU-hour, micro-dollars.
    pub price_micros: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Where attempts get their working directories.
    pub work_dir: PathBuf,
    /// Cap per log stream of an attempt, bytes.
    pub log_cap_bytes: u64,
    /// How long the output of an attempt that no longer runs stays on disk.
    pub log_retention: Duration,
    /// The ports (inclusive) gangs whose rank 0 runs here may use for their rendezvous; None:
    /// the servers' default, 29500 to 30499.
    pub rendezvous_ports: Option<(u16, u16)>,
    /// TLS with the agent's certificate (naming `tessera://agent/<name>`), or plain
    /// (`--insecure`).
    pub security: tessera_tls::Security,
    /// Object-store clients for jobs whose `checkpoint_dir` is an `s3://`, `az://` or `gs://`
    /// URL (see [`crate::checkpoint`]).
    pub checkpoint_stores: Stores,
    /// Steps of each shard kept in the object store; older ones are deleted after an upload.
    pub checkpoint_keep: usize,
}

struct Running {
    shard: Arc<Shard>,
    /// Bytes of stdout and stderr already sent to the leader.
    log_offsets: [u64; 2],
    job_id: u64,
    shard_index: u32,
    gpus: Vec<u32>,
    last_checkpoint_step: Option<u64>,
    /// For a job whose checkpoints go to an object store: the worker copying them. Dropped at
    /// the exit, after the last checkpoints are queued.
    uploads: Option<Uploader>,
}

/// An attempt that exited while its checkpoints were still being copied to the object store:
/// its exit is reported once the copies are done (or given up), so that the servers re-place
/// it from the newest durable checkpoint. Until then it is still running as the servers see it.
struct Held {
    running: Running,
    exit: ExitInfo,
}

/// A session left for silence, kept open until the agent registers elsewhere or its fence has
/// fired. The leader judges a node whose stream closed within a second (a dead agent's stream
/// closes at once, and its shards should move fast), so a live agent must not close its
/// stream while its shards may still run: a leader that is only slow, or one whose acks a
/// one-way partition drops, would re-place them while they run here.
struct Lingering {
    _client: v1::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    _tx: mpsc::Sender<v1::AgentMessage>,
    _inbound: tonic::Streaming<v1::ServerMessage>,
    /// When the fence has surely fired (or there were no shards to fence).
    until: Instant,
}

/// An assigned attempt whose checkpoint is being downloaded before it starts.
struct Preparing {
    job_id: u64,
    shard_index: u32,
    task: tokio::task::AbortHandle,
}

/// A download finished: start the attempt with the local copy, or report why not.
struct Prepared {
    assignment: v1::AssignShard,
    result: Result<(std::path::PathBuf, u64, Duration), String>,
}

/// The agent's state across sessions.
pub struct Agent {
    cfg: AgentConfig,
    gpus: Box<dyn GpuSource>,
    running: BTreeMap<u64, Running>,
    /// The protocol's state, shared with the fence watchdog.
    shared: Arc<Shared>,
    exit_tx: mpsc::UnboundedSender<(u64, ExitInfo)>,
    exit_rx: mpsc::UnboundedReceiver<(u64, ExitInfo)>,
    fault_tx: mpsc::UnboundedSender<(u32, GpuEventKind)>,
    fault_rx: mpsc::UnboundedReceiver<(u32, GpuEventKind)>,
    notice_tx: mpsc::UnboundedSender<crate::cloud::Notice>,
    /// Where to send the ids of Azure Scheduled Events to acknowledge once no shard runs here
    /// any more (then the cloud need not wait out the event's notice period).
    ack_tx: Option<mpsc::UnboundedSender<String>>,
    notice_rx: mpsc::UnboundedReceiver<crate::cloud::Notice>,
    /// When output past its retention was last looked for.
    last_sweep: Option<Instant>,
    /// Last progress of attempts that exited since the previous heartbeat (sent with it once).
    final_progress: Vec<v1::AttemptProgress>,
    /// Attempts that exited with checkpoint copies still under way.
    held: BTreeMap<u64, Held>,
    /// Attempts downloading their checkpoint before they start.
    preparing: BTreeMap<u64, Preparing>,
    prepared_tx: mpsc::UnboundedSender<Prepared>,
    prepared_rx: mpsc::UnboundedReceiver<Prepared>,
    upload_tx: mpsc::UnboundedSender<UploadEvent>,
    upload_rx: mpsc::UnboundedReceiver<UploadEvent>,
    /// The deadline of the latest spot notice (Unix ms), to report each checkpoint copied
    /// before it with its margin.
    spot_deadline_ms: Option<u64>,
    /// The session last left for silence, still open (see [`Lingering`]).
    lingering: Option<Lingering>,
    /// Where recent attempts' checkpoints go, to prune them once the servers accept newer ones
    /// (acks can come after the attempt is gone); the newest [`PRUNABLE_KEPT`].
    prunable: BTreeMap<u64, (Arc<dyn object_store::ObjectStore>, Target)>,
    /// What the metrics endpoint shows.
    pub metrics: Arc<AgentMetrics>,
}

/// What the agent's metrics endpoint serves: GPU metrics under dcgm-exporter's names, and the
/// agent's own counters.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Prometheus text of the latest GPU samples.
    pub gpus: std::sync::Mutex<String>,
    /// Attempts running on this node.
    pub shards_running: AtomicU64,
    /// Sessions opened after the first.
    pub reconnects: AtomicU64,
    /// Times the agent stopped its shards because no leader answered for the fence timeout.
    pub fenced: AtomicU64,
    /// Malformed progress lines of the running attempts.
    pub progress_lines_rejected: AtomicU64,
    /// Per GPU: processes using it that belong to no shard (from the per-process query).
    pub foreign: std::sync::Mutex<BTreeMap<u32, usize>>,
    /// Checkpoints copied to an object store, and their bytes.
    pub checkpoint_uploads: AtomicU64,
    pub checkpoint_upload_bytes: AtomicU64,
    /// Failed tries to copy a checkpoint (each retried with backoff, or given up).
    pub checkpoint_upload_failures: AtomicU64,
    /// Checkpoints downloaded before an attempt started, and their bytes.
    pub checkpoint_downloads: AtomicU64,
    pub checkpoint_download_bytes: AtomicU64,
    /// Seconds between the last checkpoint copied after a spot notice and the notice's
    /// deadline (negative: after it), in milliseconds; 0 until there is one.
    pub spot_checkpoint_margin_ms: std::sync::atomic::AtomicI64,
}

impl AgentMetrics {
    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = self.gpus.lock().map(|g| g.clone()).unwrap_or_default();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        };
        one(
            "tessera_agent_shards_running",
            "gauge",
            "Shard attempts running on this node.",
            self.shards_running.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_reconnects_total",
            "counter",
            "Sessions opened after the first.",
            self.reconnects.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_fenced_total",
            "counter",
            "Times the agent stopped its shards for lack of a leader.",
            self.fenced.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_progress_lines_rejected",
            "gauge",
            "Malformed progress lines of the running attempts.",
            self.progress_lines_rejected.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_checkpoint_uploads_total",
            "counter",
            "Checkpoints copied to an object store.",
            self.checkpoint_uploads.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_checkpoint_upload_bytes_total",
            "counter",
            "Bytes of checkpoints copied to an object store.",
            self.checkpoint_upload_bytes.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_checkpoint_upload_failures_total",
            "counter",
            "Failed tries to copy a checkpoint to an object store.",
            self.checkpoint_upload_failures.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_checkpoint_downloads_total",
            "counter",
            "Checkpoints downloaded from an object store before an attempt started.",
            self.checkpoint_downloads.load(Ordering::Relaxed),
        );
        one(
            "tessera_agent_checkpoint_download_bytes_total",
            "counter",
            "Bytes of checkpoints downloaded from an object store.",
            self.checkpoint_download_bytes.load(Ordering::Relaxed),
        );
        let margin = self.spot_checkpoint_margin_ms.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# HELP tessera_agent_spot_checkpoint_margin_seconds Time left before the spot notice's deadline when the last checkpoint after it was durable.\n# TYPE tessera_agent_spot_checkpoint_margin_seconds gauge\ntessera_agent_spot_checkpoint_margin_seconds {}\n",
            margin as f64 / 1000.0
        ));
        if let Ok(f) = self.foreign.lock()
            && !f.is_empty()
        {
            out.push_str(
                "# HELP tessera_gpu_foreign_processes Processes on the GPU that belong to no Tessera shard.\n",
            );
            out.push_str("# TYPE tessera_gpu_foreign_processes gauge\n");
            for (gpu, n) in f.iter() {
                out.push_str(&format!("tessera_gpu_foreign_processes{{gpu=\"{gpu}\"}} {n}\n"));
            }
        }
        out
    }
}

fn registration(
    cfg: &AgentConfig,
    gpus: &dyn GpuSource,
    running: &BTreeMap<u64, Running>,
    finished: &BTreeMap<u64, (u64, u32)>,
    waiting: &BTreeMap<u64, (u64, u32)>,
) -> v1::Register {
    v1::Register {
        name: cfg.name.clone(),
        cloud: cfg.cloud as i32,
        region: cfg.region.clone(),
        zone: cfg.zone.clone(),
        instance_type: cfg.instance_type.clone(),
        spot: cfg.spot,
        price_per_gpu_hour_micros: cfg.price_micros,
        cpu_millis: std::thread::available_parallelism().map(|n| n.get() as u64 * 1000).unwrap_or(1000),
        memory_mib: host_memory_mib(),
        gpus: gpus
            .inventory()
            .iter()
            .map(|g| v1::GpuInfo {
                index: g.index,
                uuid: g.uuid.clone(),
                model: g.model.clone(),
                memory_mib: g.memory_mib,
            })
            .collect(),
        labels: cfg.labels.clone().into_iter().collect(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        simulated: gpus.simulated(),
        running_attempts: running
            .iter()
            .map(|(id, r)| v1::RunningAttempt {
                attempt_id: *id,
                job_id: r.job_id,
                shard_index: r.shard_index,
                pid: r.shard.pid(),
                started_unix_ms: 0,
            })
            .chain(finished.iter().chain(waiting.iter()).map(|(id, (job, shard))| v1::RunningAttempt {
                attempt_id: *id,
                job_id: *job,
                shard_index: *shard,
                pid: 0,
                started_unix_ms: 0,
            }))
            .collect(),
        advertise_addr: cfg.advertise.clone(),
        rendezvous_port_min: cfg.rendezvous_ports.map_or(0, |r| u32::from(r.0)),
        rendezvous_port_max: cfg.rendezvous_ports.map_or(0, |r| u32::from(r.1)),
        ..Default::default()
    }
}

/// Total host memory in MiB, from /proc/meminfo (0 when unknown).
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// What the session loop and the self-fencing watchdog share. The watchdog checks the fence
/// every 50 ms apart from the loop, so no wait in the loop (a slow connect to a partitioned
/// server, a stream that does not drain) can delay the fence past the servers' node-down
/// timeout. Neither lock is held across an await, nor both at once.
struct Shared {
    core: Mutex<Protocol>,
    /// The running shards by attempt, for the watchdog to kill.
    shards: Mutex<BTreeMap<u64, Arc<Shard>>>,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Protocol> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shards(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Shard>>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kill every shard when nothing was acknowledged for the fence timeout.
    fn check_fence(&self, metrics: &AgentMetrics) {
        let actions = self.core().check_fence(Instant::now());
        for action in actions {
            let Action::Fence { attempts } = action else { continue };
            tracing::warn!(running = attempts.len(), "no leader reachable for the fence timeout: killing every shard");
            metrics.fenced.fetch_add(1, Ordering::Relaxed);
            // The leader may place these shards elsewhere once its node-down timeout (just after
            // the fence) passes: there is no time for a checkpoint ladder. Their exits are
            // reported once reconnected.
            let shards = self.shards();
            for id in attempts {
                if let Some(shard) = shards.get(&id) {
                    shard.kill_now();
                }
            }
        }
    }
}

/// One attempt's progress as the heartbeat carries it.
fn attempt_progress(attempt: u64, p: &crate::shard::Progress) -> v1::AttemptProgress {
    v1::AttemptProgress {
        attempt_id: attempt,
        step: p.step,
        total_steps: p.total_steps,
        metrics: p.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        malformed_lines: p.malformed_lines,
        updated_unix_ms: p
            .updated_at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// Log what the leader says that only the log needs (the protocol acts on the rest).
fn log_message(m: &v1::ServerMessage) {
    match &m.payload {
        Some(Out::Ack(a)) if a.rejected => tracing::debug!(seq = a.seq, reason = %a.reason, "report refused"),
        Some(Out::ForgetAttempts(f)) => {
            tracing::info!(attempts = ?f.attempt_ids, reason = %f.reason, "forgetting attempts");
        }
        Some(Out::Drain(d)) => tracing::info!(draining = d.draining, "drain state changed"),
        _ => {}
    }
}

/// A random number for the protocol's jitter.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

impl Agent {
    /// An agent over these GPUs.
    pub fn new(cfg: AgentConfig, gpus: Box<dyn GpuSource>) -> Agent {
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        let (fault_tx, fault_rx) = mpsc::unbounded_channel();
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        let (prepared_tx, prepared_rx) = mpsc::unbounded_channel();
        let (upload_tx, upload_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            core: Mutex::new(Protocol::new(cfg.servers.clone(), Instant::now())),
            shards: Mutex::new(BTreeMap::new()),
        });
        Agent {
            cfg,
            gpus,
            running: BTreeMap::new(),
            shared,
            exit_tx,
            exit_rx,
            fault_tx,
            fault_rx,
            last_sweep: None,
            final_progress: Vec::new(),
            held: BTreeMap::new(),
            preparing: BTreeMap::new(),
            prepared_tx,
            prepared_rx,
            upload_tx,
            upload_rx,
            spot_deadline_ms: None,
            lingering: None,
            prunable: BTreeMap::new(),
            notice_tx,
            ack_tx: None,
            notice_rx,
            metrics: Arc::new(AgentMetrics::default()),
        }
    }

    /// Where spot interruption notices are sent.
    pub fn notice_sender(&self) -> mpsc::UnboundedSender<crate::cloud::Notice> {
        self.notice_tx.clone()
    }

    /// A spot notice: ask every shard to checkpoint now, and tell the servers at once (they
    /// drain the node and move its shards).
    /// Where the ids of Azure Scheduled Events go once this host's shards have all stopped,
    /// for the notice watcher to acknowledge.
    pub fn acknowledgements(&mut self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.ack_tx = Some(tx);
        rx
    }

    /// Acknowledge the Azure events waiting for this host's shards to stop, once none runs and
    /// the servers have acknowledged every report (exits, last checkpoints, last output): after
    /// the acknowledgement the host may go at once.
    fn acknowledge_when_idle(&self, event_id: String) {
        tracing::info!(event = %event_id, "every shard stopped: acknowledging the scheduled event");
        if let Some(tx) = &self.ack_tx {
            let _ = tx.send(event_id);
        }
    }

    fn spot_notice(&mut self, n: crate::cloud::Notice) {
        if n.deadline_unix_ms > 0 {
            self.spot_deadline_ms = Some(n.deadline_unix_ms);
        }
        for r in self.running.values() {
            r.shard.checkpoint_now();
        }
        if matches!(n.kind, crate::cloud::NoticeKind::AzurePreempt | crate::cloud::NoticeKind::AzureTerminate) {
            self.shared.core().acknowledge_when_idle(n.event_id.clone());
        }
        let kind = match n.kind {
            crate::cloud::NoticeKind::AwsInstanceAction => v1::SpotNoticeKind::AwsInstanceAction,
            crate::cloud::NoticeKind::AzurePreempt => v1::SpotNoticeKind::AzurePreempt,
            crate::cloud::NoticeKind::AzureTerminate => v1::SpotNoticeKind::AzureTerminate,
        };
        self.queue(In::SpotNotice(v1::SpotNotice {
            kind: kind as i32,
            deadline_unix_ms: n.deadline_unix_ms,
            event_id: n.event_id,
            detail: n.detail,
        }));
    }

    /// Where faults for simulated GPUs are sent (the metrics endpoint's /simulate/ paths).
    pub fn fault_injector(&self) -> mpsc::UnboundedSender<(u32, GpuEventKind)> {
        self.fault_tx.clone()
    }

    fn queue(&mut self, p: In) {
        self.shared.core().queue(p);
    }

    /// Run until `shutdown` fires; then stop every shard.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (shared, metrics) = (self.shared.clone(), self.metrics.clone());
        let watchdog = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                shared.check_fence(&metrics);
            }
        });
        loop {
            self.end_lingering();
            let Some(addr) = self.shared.core().next_address() else {
                tracing::error!("no server to connect to");
                break;
            };
            let end = tokio::select! {
                _ = &mut shutdown => None,
                end = self.session(&addr) => Some(end),
            };
            let Some(end) = end else { break };
            let wait = self.shared.core().session_ended(end, random());
            if !wait.is_zero() {
                self.pause(wait).await;
            }
        }
        watchdog.abort();
        tracing::info!("agent stopping: stopping every shard");
        let shards: Vec<Arc<Shard>> = self.running.values().map(|r| r.shard.clone()).collect();
        for s in shards {
            s.stop().await;
        }
    }

    fn collect_exits(&mut self) {
        while let Ok(n) = self.notice_rx.try_recv() {
            self.spot_notice(n);
        }
        while let Ok((attempt, exit)) = self.exit_rx.try_recv() {
            self.exited(attempt, exit);
        }
        while let Ok(e) = self.upload_rx.try_recv() {
            self.upload_event(e);
        }
        while let Ok(p) = self.prepared_rx.try_recv() {
            self.prepared(p);
        }
    }

    fn exited(&mut self, attempt: u64, exit: ExitInfo) {
        if let Some(mut r) = self.running.remove(&attempt) {
            for g in &r.gpus {
                self.gpus.set_busy(*g, false);
            }
            self.shared.shards().remove(&attempt);
            if let Some(uploads) = r.uploads.take() {
                // The last checkpoints go to the worker, and the exit waits for their copies:
                // the next attempt must resume from the newest durable one.
                for (step, uri) in r.shard.new_checkpoints() {
                    if r.last_checkpoint_step.is_none_or(|s| step >= s) {
                        r.last_checkpoint_step = Some(step);
                        uploads.push(step, uri);
                    }
                }
                drop(uploads);
                tracing::info!(attempt, "shard exited: its exit is reported once its checkpoints are copied");
                self.held.insert(attempt, Held { running: r, exit });
                return;
            }
            self.report_exit(attempt, r, exit);
        }
    }

    /// Report an exit, after the attempt's last output and checkpoints.
    fn report_exit(&mut self, attempt: u64, mut r: Running, exit: ExitInfo) {
        {
            // Output and checkpoints written before the exit go first: after it the attempt is
            // not live.
            let mut reports = log_chunks(attempt, &r.shard, &mut r.log_offsets, LOG_FINAL_BYTES);
            for (step, uri) in r.shard.new_checkpoints() {
                if r.last_checkpoint_step.is_none_or(|s| step >= s) {
                    reports.push(In::CheckpointReport(v1::CheckpointReport {
                        attempt_id: attempt,
                        step,
                        uri,
                        ..Default::default()
                    }));
                }
            }
            self.final_progress.push(attempt_progress(attempt, &r.shard.progress()));
            let termination = match (exit.code, exit.signal) {
                (Some(c), _) => Some(v1::shard_exited::Termination::ExitCode(c)),
                (None, Some(s)) => Some(v1::shard_exited::Termination::Signal(s)),
                _ => None,
            };
            let mut core = self.shared.core();
            for report in reports {
                core.queue(report);
            }
            core.exited(attempt, r.job_id, r.shard_index, termination);
        }
    }

    /// What an attempt's upload worker says.
    fn upload_event(&mut self, e: UploadEvent) {
        let m = &self.metrics;
        match e {
            UploadEvent::Durable { attempt, step, uri, bytes, took } => {
                m.checkpoint_uploads.fetch_add(1, Ordering::Relaxed);
                m.checkpoint_upload_bytes.fetch_add(bytes, Ordering::Relaxed);
                let now_ms = unix_ms();
                match self.spot_deadline_ms {
                    Some(deadline) => {
                        let margin = deadline as i64 - now_ms as i64;
                        m.spot_checkpoint_margin_ms.store(margin, Ordering::Relaxed);
                        tracing::info!(attempt, step, %uri, bytes, took_ms = took.as_millis() as u64, spot_margin_ms = margin,
                            "checkpoint durable in the object store before the spot deadline");
                    }
                    None => tracing::info!(attempt, step, %uri, bytes, took_ms = took.as_millis() as u64,
                        "checkpoint durable in the object store"),
                }
                if self.running.contains_key(&attempt) || self.held.contains_key(&attempt) {
                    self.queue(In::CheckpointReport(v1::CheckpointReport {
                        attempt_id: attempt,
                        step,
                        uri,
                        reported_unix_ms: now_ms,
                    }));
                }
            }
            UploadEvent::Failed { attempt, step, try_number, error, retry_in } => {
                m.checkpoint_upload_failures.fetch_add(1, Ordering::Relaxed);
                match retry_in {
                    Some(wait) => {
                        tracing::warn!(attempt, step, try_number, %error, retry_in_ms = wait.as_millis() as u64,
                        "checkpoint copy to the object store failed; retrying")
                    }
                    None => tracing::error!(attempt, step, try_number, %error,
                        "checkpoint copy to the object store failed; giving up on this checkpoint (it is not reported)"),
                }
            }
            UploadEvent::Pruned { attempt, objects } => {
                tracing::debug!(
                    attempt,
                    objects,
                    keep = self.cfg.checkpoint_keep,
                    "old checkpoints deleted from the object store"
                );
            }
            UploadEvent::Done { attempt } => {
                if let Some(h) = self.held.remove(&attempt) {
                    self.report_exit(attempt, h.running, h.exit);
                }
            }
        }
    }

    /// A checkpoint download ended: start the attempt from the local copy, or report why not.
    fn prepared(&mut self, p: Prepared) {
        let attempt = p.assignment.attempt_id;
        // Stopped or forgotten while it downloaded: already reported, or not to be.
        let Some(prep) = self.preparing.remove(&attempt) else { return };
        if self.shared.core().is_fenced(attempt) {
            // No leader answered while it downloaded: it must not start now.
            self.shared.core().exited(attempt, prep.job_id, prep.shard_index, None);
            return;
        }
        match p.result {
            Ok((path, bytes, took)) => {
                self.metrics.checkpoint_downloads.fetch_add(1, Ordering::Relaxed);
                self.metrics.checkpoint_download_bytes.fetch_add(bytes, Ordering::Relaxed);
                let from = p.assignment.resume_from.clone().unwrap_or_default();
                tracing::info!(attempt, %from, to = %path.display(), bytes, took_ms = took.as_millis() as u64,
                    "checkpoint downloaded");
                let mut a = p.assignment;
                a.resume_from = Some(path.to_string_lossy().into_owned());
                self.launch(a);
            }
            Err(e) => {
                let from = p.assignment.resume_from.unwrap_or_default();
                tracing::warn!(attempt, %from, error = %e, "checkpoint download failed");
                self.shared.core().start_failed(attempt, format!("could not download the checkpoint {from}: {e}"));
            }
        }
    }

    /// Prune each attempt's copies older than the newest `--checkpoint-keep` the servers have
    /// accepted, in the background.
    fn prune_checkpoints(&mut self) {
        let acked = self.shared.core().take_acked_checkpoints();
        let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
        for (attempt, step) in acked {
            let s = newest.entry(attempt).or_default();
            *s = (*s).max(step);
        }
        for (attempt, step) in newest {
            let Some((store, target)) = self.prunable.get(&attempt).cloned() else { continue };
            let events = self.upload_tx.clone();
            tokio::spawn(async move {
                let r = crate::checkpoint::prune(
                    store.as_ref(),
                    &target.remote,
                    target.job,
                    target.shard,
                    target.keep,
                    step,
                );
                match r.await {
                    Ok(0) => {}
                    Ok(objects) => drop(events.send(UploadEvent::Pruned { attempt, objects })),
                    Err(e) => tracing::warn!(attempt, error = %e, "pruning old checkpoints failed"),
                }
            });
        }
    }

    /// Close the session left for silence once the fence has surely fired.
    fn end_lingering(&mut self) {
        if self.lingering.as_ref().is_some_and(|l| Instant::now() >= l.until) {
            self.lingering = None;
        }
    }

    /// Wait between tries, still collecting exits (the fence watchdog runs on its own).
    async fn pause(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            self.collect_exits();
            self.end_lingering();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
    }

    async fn session(&mut self, addr: &str) -> SessionEnd {
        let endpoint = match self.cfg.security.endpoint(addr) {
            Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
            Err(e) => {
                tracing::error!(%addr, error = %e, "bad server address");
                return SessionEnd::Unreachable;
            }
        };
        let endpoint = endpoint
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        // Never wait on one server longer than the fence: the watchdog fences between tries.
        let limit = self.shared.core().connect_limit();
        let channel = match tokio::time::timeout(limit, self.cfg.security.connect(&endpoint)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "server unreachable");
                return SessionEnd::Unreachable;
            }
            Err(_) => return SessionEnd::Unreachable,
        };
        let (tx, out) = mpsc::channel::<v1::AgentMessage>(1024);
        let finished = self.shared.core().finished().clone();
        // Attempts still copying checkpoints, or downloading one, run as far as the servers know.
        let waiting: BTreeMap<u64, (u64, u32)> = self
            .held
            .iter()
            .map(|(id, h)| (*id, (h.running.job_id, h.running.shard_index)))
            .chain(self.preparing.iter().map(|(id, p)| (*id, (p.job_id, p.shard_index))))
            .collect();
        let reg = registration(&self.cfg, self.gpus.as_ref(), &self.running, &finished, &waiting);
        let reg = self.shared.core().register(reg);
        let _ = tx.send(reg).await;
        let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
        let mut inbound = match tokio::time::timeout(limit, client.session(ReceiverStream::new(out))).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => {
                tracing::warn!(%addr, code = ?status.code(), message = %status.message(), "session refused");
                return SessionEnd::Unreachable;
            }
            Err(_) => return SessionEnd::Unreachable,
        };
        let reply = match tokio::time::timeout(limit, inbound.message()).await {
            Ok(m) => m,
            Err(_) => return SessionEnd::Unreachable,
        };
        let resend = match reply {
            Ok(Some(v1::ServerMessage { payload: Some(Out::Registered(r)) })) => {
                tracing::info!(%addr, node = r.node_id, leader = r.leader_id, "registered");
                // The new leader has us: the silent session may close now.
                self.lingering = None;
                // The fence counts from now; reports never acknowledged go again.
                self.shared.core().registered(&r, Instant::now())
            }
            Ok(Some(v1::ServerMessage { payload: Some(Out::NotLeader(n)) })) => {
                return crate::protocol::not_leader(n);
            }
            Ok(other) => {
                tracing::warn!(%addr, reply = ?other, "unexpected answer to Register");
                return SessionEnd::Unreachable;
            }
            Err(status) => {
                tracing::warn!(%addr, code = ?status.code(), message = %status.message(), "registration refused");
                return SessionEnd::Unreachable;
            }
        };
        if self.shared.core().is_reconnect() {
            self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        // A new leader keeps no logs yet: start it with the tail of each running attempt's.
        for r in self.running.values_mut() {
            for (i, stream) in [1, 2].into_iter().enumerate() {
                let (_, end) = r.shard.stream(stream).kept();
                r.log_offsets[i] = r.log_offsets[i].min(end.saturating_sub(LOG_RESEND_BYTES));
            }
        }
        if let Some(end) = self.perform(&tx, resend).await {
            return end;
        }
        loop {
            let due = tokio::time::Instant::from_std(self.shared.core().next_wake());
            let actions = tokio::select! {
                _ = tokio::time::sleep_until(due) => self.shared.core().tick(Instant::now()),
                // An exit is reported at once, not at the next heartbeat: the servers re-place
                // work only once they know.
                Some((attempt, exit)) = self.exit_rx.recv() => {
                    self.exited(attempt, exit);
                    self.shared.core().flush()
                }
                // A durable checkpoint is reported at once too; so is a start after a download.
                Some(e) = self.upload_rx.recv() => {
                    self.upload_event(e);
                    self.shared.core().flush()
                }
                Some(p) = self.prepared_rx.recv() => {
                    self.prepared(p);
                    self.shared.core().flush()
                }
                msg = inbound.message() => {
                    let m = match msg {
                        Ok(Some(m)) => m,
                        _ => return SessionEnd::Broken,
                    };
                    log_message(&m);
                    self.shared.core().on_message(m, Instant::now())
                }
            };
            if let Some(end) = self.perform(&tx, actions).await {
                if end == SessionEnd::Silent {
                    // Every message is acknowledged: silence means a dead or frozen far end (a
                    // crashed host, a paused leader, a partition without a reset).
                    let silence_ms = self.shared.core().silence_limit().as_millis() as u64;
                    tracing::warn!(%addr, silence_ms, "no acknowledgement within the silence limit; reconnecting");
                    // Leave it open: closing it would tell that server we are gone while our
                    // shards run on until the fence.
                    let until = self.shared.core().fence_deadline() + Duration::from_millis(200);
                    self.lingering = Some(Lingering { _client: client, _tx: tx, _inbound: inbound, until });
                }
                return end;
            }
        }
    }

    /// Perform the protocol's actions in order, and those they lead to; `Some` when the
    /// session is over.
    async fn perform(&mut self, tx: &mpsc::Sender<v1::AgentMessage>, actions: Vec<Action>) -> Option<SessionEnd> {
        let mut todo: VecDeque<Action> = actions.into();
        while let Some(action) = todo.pop_front() {
            let more = match action {
                // A report stays in the outbox: if the stream is gone it goes again later.
                Action::Send(m) => {
                    let _ = tx.send(m).await;
                    Vec::new()
                }
                Action::SendOnce(m) => {
                    if tx.send(m).await.is_err() {
                        return Some(SessionEnd::Broken);
                    }
                    Vec::new()
                }
                Action::Heartbeat => {
                    self.sweep_logs();
                    self.prune_checkpoints();
                    self.collect_exits();
                    let mut more = self.shared.core().idle_acks();
                    self.watch_progress_and_gpus();
                    let hb = self.heartbeat();
                    // The reports queued since go first, then the heartbeat.
                    more.extend(self.shared.core().heartbeat(hb, Instant::now()));
                    more
                }
                Action::Start(a) => {
                    // ShardStarted goes at once too.
                    self.assign(a);
                    self.shared.core().flush()
                }
                Action::Stop { attempt } => {
                    if let Some(r) = self.running.get(&attempt) {
                        let shard = r.shard.clone();
                        tokio::spawn(async move { shard.stop().await });
                        Vec::new()
                    } else if let Some(p) = self.preparing.remove(&attempt) {
                        // Nothing runs yet: end the download and report the stop at once.
                        p.task.abort();
                        let mut core = self.shared.core();
                        core.exited(attempt, p.job_id, p.shard_index, Some(v1::shard_exited::Termination::Signal(15)));
                        core.flush()
                    } else {
                        Vec::new()
                    }
                }
                Action::Forget { attempts } => {
                    // The scheduler no longer runs these here (they may run elsewhere): kill at
                    // once; the protocol reports nothing more about them.
                    for id in attempts {
                        if let Some(r) = self.running.remove(&id) {
                            for g in &r.gpus {
                                self.gpus.set_busy(*g, false);
                            }
                            r.shard.kill_now();
                        }
                        self.held.remove(&id);
                        if let Some(p) = self.preparing.remove(&id) {
                            p.task.abort();
                        }
                        self.shared.shards().remove(&id);
                    }
                    Vec::new()
                }
                // Only the watchdog checks the fence.
                Action::Fence { .. } => Vec::new(),
                Action::ReadLog(r) => {
                    // Sent at once, after what was queued before, and not kept for resending:
                    // the server asks again.
                    let answer = self.read_log(&r);
                    self.shared.core().answer(In::LogRead(answer))
                }
                Action::AckCloudEvent(id) => {
                    self.acknowledge_when_idle(id);
                    Vec::new()
                }
                Action::End(end) => return Some(end),
            };
            for a in more.into_iter().rev() {
                todo.push_front(a);
            }
        }
        None
    }

    /// Every ten minutes, remove the output of attempts that no longer run here once it is
    /// older than the retention.
    fn sweep_logs(&mut self) {
        if self.last_sweep.is_some_and(|t| t.elapsed() < LOG_SWEEP_EVERY) {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let Some(before) = std::time::SystemTime::now().checked_sub(self.cfg.log_retention) else { return };
        let finished = self.shared.core().finished().clone();
        let keep = |a: u64| self.running.contains_key(&a) || finished.contains_key(&a);
        let removed = crate::shard::sweep_output(&self.cfg.work_dir, &keep, before);
        if removed > 0 {
            tracing::info!(removed, retention_s = self.cfg.log_retention.as_secs(), "removed old shard output");
        }
    }

    /// Part of an attempt's output from this host's disk, for the servers.
    fn read_log(&self, r: &v1::ReadLog) -> v1::LogRead {
        let dir = self
            .cfg
            .work_dir
            .join(format!("job-{}", r.job_id))
            .join(format!("shard-{}", r.shard_index))
            .join(format!("attempt-{}", r.attempt_id));
        let name = if r.stream == v1::LogStream::Stderr as i32 { "stderr.log" } else { "stdout.log" };
        let files = crate::shard::StreamFiles::new(dir.join(name));
        let found = dir.is_dir();
        let (offset, data) = files.read(r.offset, r.max_bytes.min(LOG_READ_MAX_BYTES));
        v1::LogRead {
            request_id: r.request_id,
            attempt_id: r.attempt_id,
            stream: r.stream,
            offset,
            data,
            end: files.kept().1,
            found,
        }
    }

    fn assign(&mut self, a: v1::AssignShard) {
        // Resuming from an object store: download first, start when it is here.
        if let Some(uri) = a.resume_from.as_deref() {
            match Remote::parse(uri) {
                Ok(Some(remote)) => return self.prepare(a, remote),
                Ok(None) => {}
                Err(e) => {
                    let message = format!("resume_from: {e}");
                    return self.shared.core().start_failed(a.attempt_id, message);
                }
            }
        }
        self.launch(a);
    }

    /// Download the checkpoint an attempt resumes from into its directory, in the background.
    fn prepare(&mut self, a: v1::AssignShard, remote: Remote) {
        let attempt = a.attempt_id;
        let from = a.resume_from.clone().unwrap_or_default();
        let store = match self.cfg.checkpoint_stores.get(&remote) {
            Ok(s) => s,
            Err(e) => {
                let message = format!("could not download the checkpoint {from}: {e}");
                return self.shared.core().start_failed(attempt, message);
            }
        };
        let dest = crate::shard::attempt_dir(&self.cfg.work_dir, a.job_id, a.shard_index, attempt).join("resume");
        let dest = std::path::absolute(&dest).unwrap_or(dest);
        tracing::info!(attempt, %from, to = %dest.display(), "downloading the checkpoint before starting");
        self.shared.core().preparing(attempt);
        let (job_id, shard_index) = (a.job_id, a.shard_index);
        let tx = self.prepared_tx.clone();
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let result = crate::checkpoint::download(store.as_ref(), &remote, &dest)
                .await
                .map(|(path, bytes)| (path, bytes, t0.elapsed()))
                .map_err(|e| e.to_string());
            let _ = tx.send(Prepared { assignment: a, result });
        });
        self.preparing.insert(attempt, Preparing { job_id, shard_index, task: task.abort_handle() });
    }

    /// Start an attempt.
    fn launch(&mut self, a: v1::AssignShard) {
        // An object-store checkpoint directory: the process writes into its own local one, and
        // the agent copies each checkpoint it reports.
        let (checkpoint_dir, remote) = match Remote::parse(&a.checkpoint_dir) {
            Ok(Some(r)) => match self.cfg.checkpoint_stores.get(&r) {
                Ok(store) => (None, Some((r, store))),
                Err(e) => {
                    let message = format!("checkpoint_dir {}: {e}", a.checkpoint_dir);
                    return self.shared.core().start_failed(a.attempt_id, message);
                }
            },
            Ok(None) => ((!a.checkpoint_dir.is_empty()).then(|| a.checkpoint_dir.clone()), None),
            Err(e) => return self.shared.core().start_failed(a.attempt_id, e.to_string()),
        };
        let launch = a.launch.unwrap_or_default();
        let spec = LaunchSpec {
            job_id: a.job_id,
            shard_index: a.shard_index,
            num_shards: launch.num_shards,
            attempt_id: a.attempt_id,
            attempt: a.attempt,
            command: a.command,
            env: a.env.into_iter().collect(),
            gpus: a.gpus.clone(),
            master_addr: launch.master_addr,
            master_port: u16::try_from(launch.master_port).unwrap_or(29_500),
            world_size: launch.world_size,
            rank: launch.rank,
            node_rank: launch.node_rank,
            nnodes: launch.nnodes,
            local_rank: launch.local_rank,
            launch: match v1::LaunchMode::try_from(a.launch_mode) {
                Ok(v1::LaunchMode::PerGpu) => LaunchMode::PerGpu,
                // Unspecified, PROCESS, or a mode this agent does not know: one process.
                _ => LaunchMode::Process,
            },
            checkpoint_dir,
            resume_from: a.resume_from,
            checkpoint_signal: a.checkpoint_signal,
            checkpoint_grace: Duration::from_millis(a.checkpoint_grace_ms),
            term_grace: Duration::from_millis(a.term_grace_ms),
            work_root: self.cfg.work_dir.clone(),
            log_cap_bytes: self.cfg.log_cap_bytes,
            network: crate::shard::network::network_defaults(self.cfg.cloud, &self.cfg.instance_type)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let base = std::path::absolute(spec.workdir()).unwrap_or_else(|_| spec.workdir()).join("checkpoints");
        match Shard::spawn(spec) {
            Ok(shard) => {
                let uploads = remote.map(|(remote, store)| {
                    let target = Target {
                        remote,
                        base,
                        job: a.job_id,
                        shard: a.shard_index,
                        attempt: a.attempt_id,
                        keep: self.cfg.checkpoint_keep,
                    };
                    self.prunable.insert(a.attempt_id, (store.clone(), target.clone()));
                    while self.prunable.len() > PRUNABLE_KEPT {
                        self.prunable.pop_first();
                    }
                    Uploader::start(store, target, self.upload_tx.clone())
                });
                let shard = Arc::new(shard);
                for g in &a.gpus {
                    self.gpus.set_busy(*g, true);
                }
                let exits = self.exit_tx.clone();
                let waiter = shard.clone();
                let attempt = a.attempt_id;
                tokio::spawn(async move {
                    let exit = waiter.wait().await;
                    let _ = exits.send((attempt, exit));
                });
                // The watchdog can kill it before the protocol fences it.
                self.shared.shards().insert(a.attempt_id, shard.clone());
                self.shared.core().started(a.attempt_id, shard.pid());
                self.running.insert(
                    a.attempt_id,
                    Running {
                        shard,
                        log_offsets: [0, 0],
                        job_id: a.job_id,
                        shard_index: a.shard_index,
                        gpus: a.gpus,
                        last_checkpoint_step: None,
                        uploads,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(attempt = a.attempt_id, error = %e, "shard could not start");
                self.shared.core().start_failed(a.attempt_id, e.to_string());
            }
        }
    }

    fn watch_progress_and_gpus(&mut self) {
        let mut reports = Vec::new();
        for (id, r) in self.running.iter_mut() {
            reports.extend(log_chunks(*id, &r.shard, &mut r.log_offsets, LOG_TICK_BYTES));
        }
        for (id, r) in self.running.iter_mut() {
            for (step, uri) in r.shard.new_checkpoints() {
                if r.last_checkpoint_step.is_none_or(|s| step >= s) {
                    r.last_checkpoint_step = Some(step);
                    if let Some(uploads) = &r.uploads {
                        // Reported once it is durable in the object store.
                        uploads.push(step, uri);
                        continue;
                    }
                    reports.push(In::CheckpointReport(v1::CheckpointReport {
                        attempt_id: *id,
                        step,
                        uri,
                        ..Default::default()
                    }));
                }
            }
        }
        while let Ok((index, kind)) = self.fault_rx.try_recv() {
            if let Err(e) = self.gpus.inject(index, kind) {
                tracing::warn!(index, error = %e, "fault not injected");
            }
        }
        for e in self.gpus.take_events() {
            let (reason, xid) = match e.kind {
                GpuEventKind::Xid(x) => (format!("XID {x}"), u32::try_from(x).ok()),
                GpuEventKind::EccUncorrectable => ("uncorrectable ECC error".to_string(), None),
            };
            reports.push(In::GpuHealthReport(v1::GpuHealthReport { gpu_index: e.index, healthy: false, reason, xid }));
        }
        for r in reports {
            self.queue(r);
        }
    }

    /// Publish the latest GPU samples and the agent's own figures for the metrics endpoint.
    fn export(&self, samples: &[crate::gpu::GpuSample]) {
        let malformed: u64 = self.running.values().map(|r| r.shard.progress().malformed_lines).sum();
        let m = &self.metrics;
        if let Ok(mut g) = m.gpus.lock() {
            *g = crate::gpu::prometheus(samples, &self.cfg.name, self.gpus.simulated());
        }
        m.shards_running.store(self.running.len() as u64, Ordering::Relaxed);
        // Processes on a GPU that belong to no shard of ours (every shard leads its own
        // process group): someone else is using our GPUs.
        let groups: std::collections::BTreeSet<i32> = self.running.values().map(|r| r.shard.pid() as i32).collect();
        for sample in samples {
            let Some(procs) = &sample.processes else { continue };
            let foreign = procs
                .iter()
                .filter(|p| {
                    let pid = nix::unistd::Pid::from_raw(p.pid as i32);
                    nix::unistd::getpgid(Some(pid)).map_or(true, |g| !groups.contains(&g.as_raw()))
                })
                .count();
            if let Ok(mut f) = m.foreign.lock() {
                let before = f.insert(sample.index, foreign);
                if foreign > 0 && before != Some(foreign) {
                    tracing::warn!(
                        gpu = sample.index,
                        processes = foreign,
                        "processes outside Tessera's shards use this GPU"
                    );
                }
            }
        }
        m.progress_lines_rejected.store(malformed, Ordering::Relaxed);
    }

    fn heartbeat(&mut self) -> v1::Heartbeat {
        // NVML calls block for milliseconds: keep them off the async workers' hot path.
        let samples = tokio::task::block_in_place(|| self.gpus.sample());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.export(&samples);
        v1::Heartbeat {
            sent_unix_ms: now_ms,
            gpus: samples
                .iter()
                .map(|s| v1::GpuTelemetry {
                    gpu_index: s.index,
                    sample_unix_ms: now_ms,
                    utilization_percent: Some(s.gpu_util_pct),
                    memory_used_mib: Some(s.mem_used_mib),
                    memory_total_mib: Some(s.mem_total_mib),
                    temperature_c: i32::try_from(s.temperature_c).ok(),
                    power_w: Some(s.power_w),
                    power_limit_w: Some(s.power_limit_w),
                    sm_clock_mhz: Some(s.sm_clock_mhz),
                    ecc_corrected_volatile: Some(s.ecc_corrected),
                    ecc_uncorrected_volatile: Some(s.ecc_uncorrected),
                    retired_pages: match s.memory_repair {
                        Some(crate::gpu::MemoryRepair::RetiredPages { .. }) => s.retired_pages,
                        _ => None,
                    },
                    remapped_rows: match s.memory_repair {
                        Some(crate::gpu::MemoryRepair::RemappedRows { .. }) => s.retired_pages,
                        _ => None,
                    },
                    xid_errors: s.last_xid.and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
                })
                .collect(),
            progress: std::mem::take(&mut self.final_progress)
                .into_iter()
                .chain(self.running.iter().map(|(id, r)| attempt_progress(*id, &r.shard.progress())))
                .collect(),
            running_attempt_ids: self.running.keys().copied().collect(),
        }
    }
}

/// Now, Unix milliseconds (for reports and the spot margin; decisions never read it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
