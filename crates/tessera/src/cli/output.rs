//! What the client commands print: the JSON documents (our own serde structs, so the shape
//! stays stable whatever the wire types do; see the list in `cli`), the tables, and the small
//! helpers for names, ages and sizes.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;
use tessera_proto::v1;

use super::CliError;

/// `-o`: how a command prints its result.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Readable text and tables.
    Table,
    /// Stable JSON: one document, or one per line for streams.
    Json,
}

/// Write bytes to stdout and flush. A reader that went away (`| head`) ends the command
/// quietly with exit code 0.
pub fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::Quiet(0)),
        Err(e) => Err(CliError::Failed(format!("cannot write to stdout: {e}"))),
    }
}

/// Write bytes to stderr (a shard's standard error, under `job logs`).
pub fn write_stderr(bytes: &[u8]) -> Result<(), CliError> {
    let mut err = std::io::stderr().lock();
    match err.write_all(bytes).and_then(|()| err.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::Quiet(0)),
        Err(e) => Err(CliError::Failed(format!("cannot write to stderr: {e}"))),
    }
}

/// Print a line on stdout.
pub fn line(s: impl AsRef<str>) -> Result<(), CliError> {
    let mut b = s.as_ref().as_bytes().to_vec();
    b.push(b'\n');
    write_stdout(&b)
}

/// Print one pretty JSON document.
pub fn json<T: Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Failed(format!("cannot encode JSON: {e}")))?;
    line(s)
}

/// Print one compact JSON document on one line (for streams).
pub fn json_line<T: Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string(v).map_err(|e| CliError::Failed(format!("cannot encode JSON: {e}")))?;
    line(s)
}

/// A table in the house style: no borders, upper-case headers, fitted to the terminal.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(header.iter().map(|h| h.to_string()));
    t
}

/// Print a table, without the padding comfy-table puts at the start of each line.
pub fn print_table(t: &comfy_table::Table) -> Result<(), CliError> {
    let text: Vec<String> = t.lines().map(|l| l.strip_prefix(' ').unwrap_or(&l).trim_end().to_string()).collect();
    line(text.join("\n"))
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

fn lower(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

/// "running" for JOB_STATE_RUNNING; "unknown" for a number this client does not know.
pub fn job_state(v: i32) -> String {
    v1::JobState::try_from(v).map_or("unknown".into(), |s| lower(s.as_str_name(), "JOB_STATE_"))
}

/// "running" for SHARD_STATE_RUNNING.
pub fn shard_state(v: i32) -> String {
    v1::ShardState::try_from(v).map_or("unknown".into(), |s| lower(s.as_str_name(), "SHARD_STATE_"))
}

/// "ready" for NODE_STATE_READY.
pub fn node_state(v: i32) -> String {
    v1::NodeState::try_from(v).map_or("unknown".into(), |s| lower(s.as_str_name(), "NODE_STATE_"))
}

/// "aws" for CLOUD_AWS; None when unspecified.
pub fn cloud(v: i32) -> Option<String> {
    match v1::Cloud::try_from(v) {
        Ok(v1::Cloud::Unspecified) => None,
        Ok(c) => Some(lower(c.as_str_name(), "CLOUD_")),
        Err(_) => Some("unknown".into()),
    }
}

/// "gpu_fault" for STOP_REASON_GPU_FAULT; None when unspecified.
pub fn stop_reason(v: i32) -> Option<String> {
    match v1::StopReason::try_from(v) {
        Ok(v1::StopReason::Unspecified) => None,
        Ok(r) => Some(lower(r.as_str_name(), "STOP_REASON_")),
        Err(_) => Some("unknown".into()),
    }
}

/// "operator" for DRAIN_REASON_OPERATOR; None when unspecified.
pub fn drain_reason(v: i32) -> Option<String> {
    match v1::DrainReason::try_from(v) {
        Ok(v1::DrainReason::Unspecified) => None,
        Ok(r) => Some(lower(r.as_str_name(), "DRAIN_REASON_")),
        Err(_) => Some("unknown".into()),
    }
}

/// "leader" for MEMBER_ROLE_LEADER.
pub fn member_role(v: i32) -> String {
    v1::MemberRole::try_from(v).map_or("unknown".into(), |r| lower(r.as_str_name(), "MEMBER_ROLE_"))
}

/// "voter" for MEMBER_KIND_VOTER.
pub fn member_kind(v: i32) -> String {
    v1::MemberKind::try_from(v).map_or("unknown".into(), |k| lower(k.as_str_name(), "MEMBER_KIND_"))
}

/// "stdout" for LOG_STREAM_STDOUT.
pub fn log_stream(v: i32) -> String {
    v1::LogStream::try_from(v).map_or("unknown".into(), |s| lower(s.as_str_name(), "LOG_STREAM_"))
}

/// "high (750)" for 750; the plain number when it has no name.
pub fn priority(p: u32) -> String {
    match p {
        250 => "low (250)".into(),
        500 => "normal (500)".into(),
        750 => "high (750)".into(),
        1000 => "critical (1000)".into(),
        p => p.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Times and sizes
// ---------------------------------------------------------------------------------------------

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// "42s", "3m", "2h5m", "4d".
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 if s % 3600 >= 60 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// "5m ago", "in 2h", "-" for 0 or unset.
pub fn when(t: Option<u64>) -> String {
    match t {
        None | Some(0) => "-".into(),
        Some(t) => {
            let now = now_ms();
            if t <= now { format!("{} ago", span(now - t)) } else { format!("in {}", span(t - now)) }
        }
    }
}

/// "80 GiB", "23.6 GiB", "512 MiB".
pub fn mib(m: u64) -> String {
    match m {
        0..1024 => format!("{m} MiB"),
        m if m.is_multiple_of(1024) => format!("{} GiB", m / 1024),
        m => format!("{:.1} GiB", m as f64 / 1024.0),
    }
}

/// "-" for None.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

// ---------------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------------

/// A checkpoint, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct CheckpointJson {
    pub step: u64,
    pub uri: String,
    pub time_unix_ms: u64,
    pub shard_index: u32,
}

impl From<&v1::Checkpoint> for CheckpointJson {
    fn from(c: &v1::Checkpoint) -> Self {
        CheckpointJson { step: c.step, uri: c.uri.clone(), time_unix_ms: c.time_unix_ms, shard_index: c.shard_index }
    }
}

/// A shard, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ShardJson {
    pub index: u32,
    pub state: String,
    pub stop_reason: Option<String>,
    pub node_id: Option<u64>,
    pub node: Option<String>,
    pub cloud: Option<String>,
    pub region: Option<String>,
    pub attempt: u32,
    pub attempt_id: Option<u64>,
    pub attempts: u32,
    pub gpus: Vec<u32>,
    pub step: u64,
    pub total_steps: Option<u64>,
    pub metrics: BTreeMap<String, f64>,
    pub straggler: bool,
    pub restarts: u32,
    pub last_checkpoint: Option<CheckpointJson>,
    pub started_unix_ms: Option<u64>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl From<&v1::Shard> for ShardJson {
    fn from(s: &v1::Shard) -> Self {
        ShardJson {
            index: s.index,
            state: shard_state(s.state),
            stop_reason: stop_reason(s.stop_reason),
            node_id: s.node_id,
            node: non_empty(&s.node_name),
            cloud: cloud(s.cloud),
            region: non_empty(&s.region),
            attempt: s.attempt,
            attempt_id: s.attempt_id,
            attempts: s.attempts,
            gpus: s.gpus.clone(),
            step: s.step,
            total_steps: s.total_steps,
            metrics: s.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            straggler: s.straggler,
            restarts: s.restarts,
            last_checkpoint: s.last_checkpoint.as_ref().map(CheckpointJson::from),
            started_unix_ms: s.started_unix_ms,
        }
    }
}

/// A job, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct JobJson {
    pub id: u64,
    pub name: String,
    pub tenant: String,
    pub submitted_by: String,
    pub state: String,
    pub priority: u32,
    pub num_shards: u32,
    pub gpus_per_shard: u32,
    pub gpu_model: Option<String>,
    pub command: Vec<String>,
    pub submitted_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    pub finished_unix_ms: Option<u64>,
    pub restarts: u32,
    pub failures: u32,
    pub cancel_requested: bool,
    pub message: String,
    pub latest_checkpoint: Option<CheckpointJson>,
    pub pending_reason: Option<ReasonJson>,
    pub shards: Vec<ShardJson>,
    /// A job array's own record: its index list and its elements' counts.
    pub array: Option<ArrayJson>,
    /// An array element: its array and index.
    pub array_job_id: Option<u64>,
    pub array_index: Option<u32>,
    pub after_ok: Vec<u64>,
    pub after_any: Vec<u64>,
    /// Dependencies not ended yet.
    pub waiting_on: Vec<u64>,
}

/// A job array's elements: {"indices": "0-999%50", "total", "not_created", "pending",
/// "running", "succeeded", "failed", "cancelled"}.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ArrayJson {
    pub indices: String,
    pub total: u64,
    pub not_created: u64,
    pub pending: u32,
    pub running: u32,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// An array's counts on one line: "12 running, 38 pending, 900 not created, 50 succeeded".
pub fn array_counts(a: &v1::ArrayStatus) -> String {
    let parts: Vec<String> = [
        (u64::from(a.running), "running"),
        (u64::from(a.pending), "pending"),
        (a.not_created, "not created"),
        (a.succeeded, "succeeded"),
        (a.failed, "failed"),
        (a.cancelled, "cancelled"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

/// Why a job waits: {"kind": "capacity", "message": "..."}.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ReasonJson {
    pub kind: String,
    pub message: String,
}

impl From<&v1::PendingReason> for ReasonJson {
    fn from(r: &v1::PendingReason) -> Self {
        ReasonJson { kind: reason_kind(r.kind), message: r.message.clone() }
    }
}

/// "gpu_fault" for JOB_EVENT_KIND_GPU_FAULT; "unknown" for a number this client does not know.
pub fn event_kind(v: i32) -> String {
    v1::JobEventKind::try_from(v).map_or("unknown".into(), |k| lower(k.as_str_name(), "JOB_EVENT_KIND_"))
}

/// A job event as JSON (`job events`).
#[derive(Serialize)]
pub struct EventJson {
    pub sequence: u64,
    pub time_unix_ms: u64,
    pub kind: String,
    pub shard: Option<u32>,
    pub attempt_id: Option<u64>,
    pub node_id: Option<u64>,
    pub node: Option<String>,
    pub stop_reason: Option<String>,
    pub message: String,
}

impl From<&v1::JobEvent> for EventJson {
    fn from(e: &v1::JobEvent) -> Self {
        EventJson {
            sequence: e.sequence,
            time_unix_ms: e.time_unix_ms,
            kind: event_kind(e.kind),
            shard: e.shard_index,
            attempt_id: e.attempt_id,
            node_id: e.node_id,
            node: non_empty(&e.node_name),
            stop_reason: stop_reason(e.stop_reason),
            message: e.message.clone(),
        }
    }
}

/// "shard 2: placed on gpu-a", or the message alone for a job-wide event.
pub fn event_line(e: &v1::JobEvent) -> String {
    match e.shard_index {
        Some(s) => format!("shard {s}: {}", e.message),
        None => format!("job: {}", e.message),
    }
}

/// "2026-12-03 14:05:01.123" (UTC) for Unix milliseconds.
pub fn utc(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => ms.to_string(),
    }
}

/// "capacity" for PENDING_REASON_KIND_CAPACITY; "unknown" for a number this client does not
/// know.
pub fn reason_kind(v: i32) -> String {
    v1::PendingReasonKind::try_from(v).map_or("unknown".into(), |k| lower(k.as_str_name(), "PENDING_REASON_KIND_"))
}

impl From<&v1::Job> for JobJson {
    fn from(j: &v1::Job) -> Self {
        let spec = j.spec.clone().unwrap_or_default();
        let res = spec.resources.clone().unwrap_or_default();
        JobJson {
            id: j.id,
            name: spec.name.clone(),
            tenant: spec.tenant.clone(),
            submitted_by: j.submitted_by.clone(),
            state: job_state(j.state),
            priority: spec.priority.unwrap_or(u32::from(tessera_core::spec::DEFAULT_PRIORITY)),
            num_shards: spec.shards,
            gpus_per_shard: res.gpus,
            gpu_model: non_empty(&res.gpu_model),
            command: spec.command.clone(),
            submitted_unix_ms: j.submitted_unix_ms,
            started_unix_ms: j.started_unix_ms,
            finished_unix_ms: j.finished_unix_ms,
            restarts: j.restarts,
            failures: j.failures,
            cancel_requested: j.cancel_requested,
            message: j.message.clone(),
            latest_checkpoint: j.latest_checkpoint.as_ref().map(CheckpointJson::from),
            pending_reason: j.pending_reason.as_ref().map(ReasonJson::from),
            shards: j.shards.iter().map(ShardJson::from).collect(),
            array: j.array.as_ref().map(|a| ArrayJson {
                indices: spec.array.clone(),
                total: a.total,
                not_created: a.not_created,
                pending: a.pending,
                running: a.running,
                succeeded: a.succeeded,
                failed: a.failed,
                cancelled: a.cancelled,
            }),
            array_job_id: (j.array_job_id != 0).then_some(j.array_job_id),
            array_index: j.array_index,
            after_ok: spec.after_ok.clone(),
            after_any: spec.after_any.clone(),
            waiting_on: j.waiting_on.clone(),
        }
    }
}

/// The step a shard has reached: its reported progress, or its checkpoint when it reported no
/// progress (progress lives only in the leader's memory).
pub fn shard_step(s: &v1::Shard) -> u64 {
    s.step.max(s.last_checkpoint.as_ref().map_or(0, |c| c.step))
}

/// "120/1000", "120", or "-" for a shard that reported nothing.
pub fn step_text(s: &v1::Shard) -> String {
    let step = shard_step(s);
    match s.total_steps {
        Some(t) => format!("{step}/{t}"),
        None if step == 0 => "-".into(),
        None => step.to_string(),
    }
}

/// "aws/us-east-1", "aws", or "-".
pub fn where_text(cloud_v: i32, region: &str) -> String {
    match (cloud(cloud_v), region.is_empty()) {
        (Some(c), false) => format!("{c}/{region}"),
        (Some(c), true) => c,
        (None, false) => region.to_string(),
        (None, true) => "-".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// Telemetry of one GPU, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TelemetryJson {
    pub sample_unix_ms: u64,
    pub utilization_percent: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub temperature_c: Option<i32>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub ecc_corrected_volatile: Option<u64>,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub retired_pages: Option<u64>,
    pub remapped_rows: Option<u64>,
    pub xid_errors: Vec<u32>,
}

/// The shard holding a GPU, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct AllocationJson {
    pub job_id: u64,
    pub shard_index: u32,
    pub attempt_id: u64,
}

/// A GPU, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct GpuJson {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_mib: u64,
    pub healthy: bool,
    pub health_reason: Option<String>,
    pub unhealthy_since_unix_ms: Option<u64>,
    pub back_unix_ms: Option<u64>,
    pub recent_faults: u32,
    pub allocation: Option<AllocationJson>,
    pub telemetry: Option<TelemetryJson>,
}

/// Is the GPU healthy? A GPU whose health the server left out counts as healthy.
pub fn gpu_healthy(g: &v1::Gpu) -> bool {
    g.health.as_ref().is_none_or(|h| h.healthy)
}

impl From<&v1::Gpu> for GpuJson {
    fn from(g: &v1::Gpu) -> Self {
        let health = g.health.clone().unwrap_or(v1::GpuHealth { healthy: true, ..Default::default() });
        GpuJson {
            index: g.index,
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            memory_mib: g.memory_mib,
            healthy: health.healthy,
            health_reason: non_empty(&health.reason),
            unhealthy_since_unix_ms: (!health.healthy && health.since_unix_ms != 0).then_some(health.since_unix_ms),
            back_unix_ms: health.until_unix_ms,
            recent_faults: health.recent_faults,
            allocation: g.allocation.as_ref().map(|a| AllocationJson {
                job_id: a.job_id,
                shard_index: a.shard_index,
                attempt_id: a.attempt_id,
            }),
            telemetry: g.telemetry.as_ref().map(|t| TelemetryJson {
                sample_unix_ms: t.sample_unix_ms,
                utilization_percent: t.utilization_percent,
                memory_used_mib: t.memory_used_mib,
                memory_total_mib: t.memory_total_mib,
                temperature_c: t.temperature_c,
                power_w: t.power_w,
                power_limit_w: t.power_limit_w,
                sm_clock_mhz: t.sm_clock_mhz,
                ecc_corrected_volatile: t.ecc_corrected_volatile,
                ecc_uncorrected_volatile: t.ecc_uncorrected_volatile,
                retired_pages: t.retired_pages,
                remapped_rows: t.remapped_rows,
                xid_errors: t.xid_errors.clone(),
            }),
        }
    }
}

/// A node, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct NodeJson {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub cloud: Option<String>,
    pub region: String,
    pub zone: String,
    pub instance_type: String,
    pub spot: bool,
    pub price_per_gpu_hour_micros: u64,
    pub simulated: bool,
    pub gpus_total: u32,
    pub gpus_free: u32,
    pub gpus_used: u32,
    pub gpus_unhealthy: u32,
    pub utilization_percent: Option<f64>,
    pub cpu_millis: u64,
    pub cpu_millis_used: u64,
    pub memory_mib: u64,
    pub memory_mib_used: u64,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub last_heartbeat_unix_ms: Option<u64>,
    pub drain_reason: Option<String>,
    pub drain_deadline_unix_ms: Option<u64>,
    pub down_since_unix_ms: Option<u64>,
    pub gpus: Vec<GpuJson>,
}

/// GPU counts of a node: (total, free, used, unhealthy).
pub fn gpu_counts(n: &v1::Node) -> (u32, u32, u32, u32) {
    let mut c = (0u32, 0u32, 0u32, 0u32);
    for g in &n.gpus {
        c.0 += 1;
        let healthy = gpu_healthy(g);
        if healthy && g.allocation.is_none() {
            c.1 += 1;
        }
        if g.allocation.is_some() {
            c.2 += 1;
        }
        if !healthy {
            c.3 += 1;
        }
    }
    c
}

/// Mean utilisation of the GPUs that reported it.
pub fn utilization(n: &v1::Node) -> Option<f64> {
    let u: Vec<f64> =
        n.gpus.iter().filter_map(|g| g.telemetry.as_ref().and_then(|t| t.utilization_percent)).map(f64::from).collect();
    (!u.is_empty()).then(|| (u.iter().sum::<f64>() / u.len() as f64 * 10.0).round() / 10.0)
}

impl From<&v1::Node> for NodeJson {
    fn from(n: &v1::Node) -> Self {
        let (total, free, used, unhealthy) = gpu_counts(n);
        NodeJson {
            id: n.id,
            name: n.name.clone(),
            state: node_state(n.state),
            cloud: cloud(n.cloud),
            region: n.region.clone(),
            zone: n.zone.clone(),
            instance_type: n.instance_type.clone(),
            spot: n.spot,
            price_per_gpu_hour_micros: n.price_per_gpu_hour_micros,
            simulated: n.simulated,
            gpus_total: total,
            gpus_free: free,
            gpus_used: used,
            gpus_unhealthy: unhealthy,
            utilization_percent: utilization(n),
            cpu_millis: n.cpu_millis,
            cpu_millis_used: n.cpu_millis_used,
            memory_mib: n.memory_mib,
            memory_mib_used: n.memory_mib_used,
            labels: n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            agent_version: n.agent_version.clone(),
            last_heartbeat_unix_ms: (n.last_heartbeat_unix_ms != 0).then_some(n.last_heartbeat_unix_ms),
            drain_reason: drain_reason(n.drain_reason),
            drain_deadline_unix_ms: n.drain_deadline_unix_ms,
            down_since_unix_ms: n.down_since_unix_ms,
            gpus: n.gpus.iter().map(GpuJson::from).collect(),
        }
    }
}

/// "8x NVIDIA H100 80GB HBM3", "mixed", or "-".
pub fn gpu_models(n: &v1::Node) -> String {
    let mut models: Vec<&str> = n.gpus.iter().map(|g| g.model.as_str()).collect();
    models.dedup();
    match models.as_slice() {
        [] => "-".into(),
        [one] => format!("{}x {one}", n.gpus.len()),
        _ => format!("{} (mixed)", n.gpus.len()),
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

/// A scheduler server, as `-o json` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MemberJson {
    pub id: u64,
    pub address: String,
    pub role: String,
    pub kind: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub match_index: Option<u64>,
    pub leader_id: Option<u64>,
    pub reachable: bool,
    pub version: String,
}

impl From<&v1::Member> for MemberJson {
    fn from(m: &v1::Member) -> Self {
        MemberJson {
            id: m.id,
            address: m.address.clone(),
            role: member_role(m.role),
            kind: member_kind(m.kind),
            term: m.term,
            commit_index: m.commit_index,
            applied_index: m.applied_index,
            match_index: m.match_index,
            leader_id: m.leader_id,
            reachable: m.reachable,
            version: m.version.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_are_lowercase_words() {
        assert_eq!(job_state(v1::JobState::Cancelled as i32), "cancelled");
        assert_eq!(job_state(99), "unknown");
        assert_eq!(shard_state(v1::ShardState::Running as i32), "running");
        assert_eq!(stop_reason(v1::StopReason::GpuFault as i32).as_deref(), Some("gpu_fault"));
        assert_eq!(stop_reason(0), None);
        assert_eq!(cloud(v1::Cloud::Aws as i32).as_deref(), Some("aws"));
        assert_eq!(member_role(v1::MemberRole::PreCandidate as i32), "pre_candidate");
        assert_eq!(drain_reason(v1::DrainReason::SpotInterruption as i32).as_deref(), Some("spot_interruption"));
    }

    #[test]
    fn spans_read_naturally() {
        assert_eq!(span(42_000), "42s");
        assert_eq!(span(180_000), "3m");
        assert_eq!(span(2 * 3_600_000 + 5 * 60_000), "2h5m");
        assert_eq!(span(7_200_000), "2h");
        assert_eq!(span(4 * 86_400_000), "4d");
        assert_eq!(mib(81920), "80 GiB");
        assert_eq!(mib(100), "100 MiB");
        assert_eq!(mib(24152), "23.6 GiB");
    }

    #[test]
    fn gpu_counts_and_utilisation() {
        let gpu = |i: u32, healthy: bool, held: bool, util: Option<u32>| v1::Gpu {
            index: i,
            model: "NVIDIA H100".into(),
            health: Some(v1::GpuHealth { healthy, ..Default::default() }),
            allocation: held.then_some(v1::GpuAllocation { job_id: 1, shard_index: 0, attempt_id: 1 }),
            telemetry: util.map(|u| v1::GpuTelemetry { utilization_percent: Some(u), ..Default::default() }),
            ..Default::default()
        };
        let n = v1::Node {
            gpus: vec![gpu(0, true, true, Some(90)), gpu(1, true, false, Some(10)), gpu(2, false, true, None)],
            ..Default::default()
        };
        assert_eq!(gpu_counts(&n), (3, 1, 2, 1));
        assert_eq!(utilization(&n), Some(50.0));
        assert_eq!(gpu_models(&n), "3x NVIDIA H100");
        let j = NodeJson::from(&n);
        assert_eq!((j.gpus_total, j.gpus_free, j.gpus_used, j.gpus_unhealthy), (3, 1, 2, 1));
    }
}
