//! Shards: one process group per attempt of one shard of a job.
//!
//! [`Shard::spawn`] makes the attempt's working directory
//! `<work_root>/job-<id>/shard-<index>/attempt-<attempt_id>/`, starts the command in a process
//! group of its own with the launch environment ([`launch_env`]): one process, or in per-GPU
//! mode ([`LaunchMode::PerGpu`]) one per GPU, all in that one group with their output on shared
//! pipes. It copies their stdout and stderr into `stdout.log` / `stderr.log` there up to a cap,
//! and tails `progress.jsonl` (the progress protocol, see [`progress`]). [`Shard::stop`] runs
//! the stop ladder: checkpoint signal, grace, SIGTERM, grace, SIGKILL to the whole attempt.
//! Once the processes the agent started have exited (in per-GPU mode: all of them, or one
//! failed, when the others are killed), the rest of the attempt is SIGKILLed, so nothing of it
//! outlives it. "The attempt" is its process group plus the processes that left the group but
//! carry its `TESSERA_PROGRESS_FILE` (torchrun's workers, each in a session of its own).

mod logs;
pub mod network;
pub mod progress;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::protocol::{Rung, StopLadder};

pub use logs::{LogStats, StreamFiles, sweep_output};
pub use progress::{CheckpointReport, Progress, ProgressParser};

/// Variables of the agent's own environment a shard inherits (when the agent has them). Anything
/// else of the agent's (credentials, for one) is not passed on; the job's own env comes on top.
pub const INHERITED_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// `PATH` for a shard when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The launch variables; they override the job's env of the same name. `TESSERA_RESUME_FROM` is
/// set only when the attempt resumes, and removed from the job's env otherwise.
pub const LAUNCH_VARS: &[&str] = &[
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "NODE_RANK",
    "NNODES",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "CUDA_VISIBLE_DEVICES",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_RDZV_BACKEND",
    "PET_RDZV_ENDPOINT",
    "PET_RDZV_ID",
    "PET_MAX_RESTARTS",
    "TESSERA_JOB_ID",
    "TESSERA_SHARD_INDEX",
    "TESSERA_NUM_SHARDS",
    "TESSERA_ATTEMPT",
    "TESSERA_CHECKPOINT_DIR",
    "TESSERA_RESUME_FROM",
    "TESSERA_PROGRESS_FILE",
];

/// How an attempt's processes are started (the job spec's `launch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LaunchMode {
    /// One process (it may start workers of its own, as torchrun does). It also gets the
    /// `PET_*` variables, so that a bare `torchrun train.py` joins the gang.
    #[default]
    Process,
    /// One process per assigned GPU, all in the attempt's one process group. Process `i` gets
    /// `RANK` = `rank` + i and `LOCAL_RANK` = `local_rank` + i; every one sees all the shard's
    /// GPUs in `CUDA_VISIBLE_DEVICES` (as under torchrun) and picks its own by `LOCAL_RANK`.
    PerGpu,
}

/// How long, after the group's leader exits, the agent waits for the log copiers and the last
/// read of the progress file before reporting the exit.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the agent needs to start one attempt of one shard.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    pub job_id: u64,
    pub shard_index: u32,
    pub num_shards: u32,
    /// Unique id of this attempt (names the working directory).
    pub attempt_id: u64,
    /// Attempt number of this shard, 0 for the first (`TESSERA_ATTEMPT`).
    pub attempt: u32,
    /// Program and arguments; the program is looked up in the shard's `PATH`.
    pub command: Vec<String>,
    /// The job's environment.
    pub env: BTreeMap<String, String>,
    /// The fabric settings of this host's cloud and instance type (see [`network`]), under the
    /// host's own `NCCL_*`/`FI_*`/`UCX_*` and the job's `env`.
    pub network: Vec<(String, String)>,
    /// Assigned GPU indices, exactly what `CUDA_VISIBLE_DEVICES` says.
    pub gpus: Vec<u32>,
    pub master_addr: String,
    pub master_port: u16,
    pub world_size: u32,
    pub rank: u32,
    pub node_rank: u32,
    pub nnodes: u32,
    pub local_rank: u32,
    /// One process, or one per GPU.
    pub launch: LaunchMode,
    /// The job's checkpoint directory or URI; `<workdir>/checkpoints` when `None`.
    pub checkpoint_dir: Option<String>,
    /// Checkpoint URI to resume from.
    pub resume_from: Option<String>,
    /// Signal asking for a checkpoint now, like "SIGUSR1" (or "USR1"), or "none".
    pub checkpoint_signal: String,
    pub checkpoint_grace: Duration,
    pub term_grace: Duration,
    pub work_root: PathBuf,
    /// Cap on each of `stdout.log` and `stderr.log`.
    pub log_cap_bytes: u64,
}

impl LaunchSpec {
    /// `<work_root>/job-<id>/shard-<index>/attempt-<attempt_id>`.
    pub fn workdir(&self) -> PathBuf {
        attempt_dir(&self.work_root, self.job_id, self.shard_index, self.attempt_id)
    }

    /// How many processes the attempt starts: one per GPU in per-GPU mode (one without
    /// GPUs), else one. This is also `LOCAL_WORLD_SIZE`.
    pub fn processes(&self) -> u32 {
        match self.launch {
            LaunchMode::Process => 1,
            LaunchMode::PerGpu => u32::try_from(self.gpus.len()).unwrap_or(u32::MAX).max(1),
        }
    }
}

/// How the group's leader ended: `code` when it exited, `signal` when a signal killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn from_status(status: std::process::ExitStatus) -> Self {
        Self { code: status.code(), signal: status.signal() }
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(s) => write!(f, "killed by {}", s.as_str()),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            (None, None) => write!(f, "unknown exit"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("invalid launch spec: {0}")]
    InvalidSpec(String),
    #[error("cannot prepare the working directory {}: {source}", path.display())]
    Workdir { path: PathBuf, source: std::io::Error },
    #[error("cannot start `{program}`: {source}")]
    Spawn { program: String, source: std::io::Error },
}

/// A running (or finished) attempt. Dropping it SIGKILLs the group if the leader is still running.
#[derive(Debug)]
pub struct Shard {
    spec: LaunchSpec,
    workdir: PathBuf,
    pid: Pid,
    /// `TESSERA_PROGRESS_FILE=<path>`: in the environment of every process of this attempt,
    /// also of those that left its process group (see [`signal_attempt`]).
    marker: Vec<u8>,
    checkpoint_signal: Option<Signal>,
    /// Set as soon as all the processes the agent started are reaped.
    leader: watch::Receiver<Option<ExitInfo>>,
    /// Set once the leader is reaped, the group killed, logs flushed and progress read to the end.
    exit: watch::Receiver<Option<ExitInfo>>,
    progress: watch::Receiver<Progress>,
    checkpoints: Mutex<Option<mpsc::UnboundedReceiver<CheckpointReport>>>,
    stop_started: AtomicBool,
    span: tracing::Span,
}

/// Parses "SIGUSR1", "USR1", "sigusr1" ...; `None` for "none".
pub fn parse_checkpoint_signal(name: &str) -> Result<Option<Signal>, ShardError> {
    let upper = name.trim().to_ascii_uppercase();
    if upper == "NONE" {
        return Ok(None);
    }
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    match Signal::from_str(&full) {
        Ok(Signal::SIGKILL | Signal::SIGSTOP) => Err(ShardError::InvalidSpec(format!(
            "checkpoint_signal: {name} cannot be caught; use e.g. SIGUSR1 or none"
        ))),
        Ok(sig) => Ok(Some(sig)),
        Err(_) => Err(ShardError::InvalidSpec(format!("checkpoint_signal: unknown signal {name:?}"))),
    }
}

/// The complete environment of a shard's (first) process: the inherited part of the agent's
/// environment (`INHERITED_ENV`, taken from `agent_env`), then the job's env, then the launch
/// variables.
pub fn launch_env(
    spec: &LaunchSpec,
    workdir: &Path,
    agent_env: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    process_env(spec, workdir, agent_env, 0)
}

/// The environment of the attempt's local process `local` (0 in process mode): as
/// [`launch_env`], with `RANK` = `spec.rank` + local and `LOCAL_RANK` = `spec.local_rank` + local.
pub fn process_env(
    spec: &LaunchSpec,
    workdir: &Path,
    agent_env: impl IntoIterator<Item = (String, String)>,
    local: u32,
) -> BTreeMap<String, String> {
    let agent_env: Vec<(String, String)> = agent_env.into_iter().collect();
    let mut env: BTreeMap<String, String> = spec.network.iter().cloned().collect();
    env.extend(agent_env.iter().filter(|(k, _)| INHERITED_ENV.contains(&k.as_str())).cloned());
    env.extend(
        agent_env.iter().filter(|(k, _)| network::PASSTHROUGH_PREFIXES.iter().any(|p| k.starts_with(p))).cloned(),
    );
    env.entry("PATH".to_string()).or_insert_with(|| DEFAULT_PATH.to_string());
    env.extend(
        spec.env.iter().filter(|(k, _)| !LAUNCH_VARS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())),
    );
    let gpus: Vec<String> = spec.gpus.iter().map(u32::to_string).collect();
    let checkpoint_dir =
        spec.checkpoint_dir.clone().unwrap_or_else(|| workdir.join("checkpoints").to_string_lossy().into_owned());
    let vars = [
        ("MASTER_ADDR", spec.master_addr.clone()),
        ("MASTER_PORT", spec.master_port.to_string()),
        ("WORLD_SIZE", spec.world_size.to_string()),
        ("RANK", spec.rank.saturating_add(local).to_string()),
        ("NODE_RANK", spec.node_rank.to_string()),
        ("GROUP_RANK", spec.node_rank.to_string()),
        ("NNODES", spec.nnodes.to_string()),
        ("LOCAL_RANK", spec.local_rank.saturating_add(local).to_string()),
        ("LOCAL_WORLD_SIZE", spec.processes().to_string()),
        ("CUDA_VISIBLE_DEVICES", gpus.join(",")),
        ("TESSERA_JOB_ID", spec.job_id.to_string()),
        ("TESSERA_SHARD_INDEX", spec.shard_index.to_string()),
        ("TESSERA_NUM_SHARDS", spec.num_shards.to_string()),
        ("TESSERA_ATTEMPT", spec.attempt.to_string()),
        ("TESSERA_CHECKPOINT_DIR", checkpoint_dir),
        ("TESSERA_PROGRESS_FILE", workdir.join("progress.jsonl").to_string_lossy().into_owned()),
    ];
    env.extend(vars.into_iter().map(|(k, v)| (k.to_string(), v)));
    if spec.launch == LaunchMode::Process {
        env.extend(torchrun_env(spec).into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    if let Some(resume) = &spec.resume_from {
        env.insert("TESSERA_RESUME_FROM".to_string(), resume.clone());
    }
    env
}

/// What a bare `torchrun train.py` reads (each `--flag` defaults to `PET_FLAG`): this node's
/// place in the gang and a static rendezvous at the gang's `MASTER_ADDR:MASTER_PORT`, hosted by
/// node rank 0's torchrun. Static, because every attempt of a gang is placed whole with its
/// ranks fixed, and a new attempt gets a fresh store. `PET_MAX_RESTARTS=0`: Tessera restarts the
/// gang, from its checkpoint, not torchrun. Flags on torchrun's command line still win.
fn torchrun_env(spec: &LaunchSpec) -> [(&'static str, String); 9] {
    let host = if spec.master_addr.contains(':') && !spec.master_addr.starts_with('[') {
        format!("[{}]", spec.master_addr)
    } else {
        spec.master_addr.clone()
    };
    [
        ("PET_NNODES", spec.nnodes.to_string()),
        ("PET_NODE_RANK", spec.node_rank.to_string()),
        ("PET_NPROC_PER_NODE", spec.gpus.len().max(1).to_string()),
        ("PET_MASTER_ADDR", spec.master_addr.clone()),
        ("PET_MASTER_PORT", spec.master_port.to_string()),
        ("PET_RDZV_BACKEND", "static".to_string()),
        ("PET_RDZV_ENDPOINT", format!("{host}:{}", spec.master_port)),
        ("PET_RDZV_ID", format!("tessera-job-{}", spec.job_id)),
        ("PET_MAX_RESTARTS", "0".to_string()),
    ]
}

fn validate(spec: &LaunchSpec) -> Result<Option<Signal>, ShardError> {
    let invalid = |m: String| Err(ShardError::InvalidSpec(m));
    match spec.command.first() {
        None => return invalid("command is empty".into()),
        Some(p) if p.is_empty() => return invalid("command: the program is an empty string".into()),
        Some(_) => {}
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return invalid("command: an argument contains a NUL byte".into());
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return invalid(format!("env: invalid variable name {k:?}"));
        }
        if v.contains('\0') {
            return invalid(format!("env: the value of {k} contains a NUL byte"));
        }
    }
    for (field, value) in
        [("master_addr", &spec.master_addr), ("checkpoint_dir", &spec.checkpoint_dir.clone().unwrap_or_default())]
    {
        if value.contains('\0') {
            return invalid(format!("{field} contains a NUL byte"));
        }
    }
    if spec.resume_from.as_deref().is_some_and(|r| r.contains('\0')) {
        return invalid("resume_from contains a NUL byte".into());
    }
    if spec.work_root.to_str().is_none() {
        return invalid(format!("work_root is not valid UTF-8: {}", spec.work_root.display()));
    }
    parse_checkpoint_signal(&spec.checkpoint_signal)
}

/// A stream of the attempt's output.
type Output = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

/// The processes of an attempt just started: the first one's pid is the process group's id.
struct Started {
    pid: Pid,
    children: Vec<tokio::process::Child>,
    out: Option<Output>,
    err: Option<Output>,
}

/// The command of one process of the attempt, without its stdout, stderr and process group.
/// torchrun gets the checkpoint signal ignored (see [`ignores_checkpoint_signal`]).
fn command(
    spec: &LaunchSpec,
    workdir: &Path,
    env: &BTreeMap<String, String>,
    checkpoint_signal: Option<Signal>,
) -> tokio::process::Command {
    let mut cmd = match checkpoint_signal.filter(|_| is_torchrun(&spec.command)) {
        Some(sig) => {
            // A shell sets the signal to "ignored" and execs torchrun, which keeps it so (a
            // disposition that survives exec); the workers install their own handlers.
            let mut c = tokio::process::Command::new("/bin/sh");
            let name = sig.as_str().trim_start_matches("SIG");
            c.arg("-c").arg(format!("trap '' {name}; exec \"$@\"")).arg("tessera-launch").args(&spec.command);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(&spec.command[0]);
            c.args(&spec.command[1..]);
            c
        }
    };
    cmd.current_dir(workdir).env_clear().envs(env).stdin(Stdio::null()).kill_on_drop(false);
    cmd
}

/// Is this command torchrun (`torchrun ...`, `python -m torch.distributed.run ...`)? torchrun
/// starts every worker in a session of its own and dies of a SIGUSR1 it does not handle, which
/// would orphan its workers; so the agent starts it with the checkpoint signal ignored and
/// sends that signal to the workers itself ([`signal_attempt`]).
pub fn is_torchrun(command: &[String]) -> bool {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    match command {
        [prog, ..] if base(prog) == "torchrun" => true,
        [prog, rest @ ..] if base(prog).starts_with("python") => rest
            .windows(2)
            .any(|w| w[0] == "-m" && matches!(w[1].as_str(), "torch.distributed.run" | "torch.distributed.launch")),
        _ => false,
    }
}

fn child_pid(child: &tokio::process::Child, program: &str) -> Result<Pid, ShardError> {
    match child.id().and_then(|id| i32::try_from(id).ok()) {
        Some(id) => Ok(Pid::from_raw(id)),
        // Cannot happen for a child nobody has waited on yet.
        None => Err(ShardError::Spawn { program: program.to_string(), source: std::io::Error::other("no pid") }),
    }
}

/// Per-GPU mode: `processes` processes in one process group (the first one's), their stdout
/// and stderr on one shared pipe each. If one cannot be started, those already started are
/// killed.
fn spawn_per_gpu(
    spec: &LaunchSpec,
    workdir: &Path,
    agent_env: &[(String, String)],
    checkpoint_signal: Option<Signal>,
    processes: u32,
) -> Result<Started, ShardError> {
    let program = spec.command[0].clone();
    let spawn_err = |source| ShardError::Spawn { program: program.clone(), source };
    let (out_r, out_w) = std::io::pipe().map_err(spawn_err)?;
    let (err_r, err_w) = std::io::pipe().map_err(spawn_err)?;
    let mut children = Vec::new();
    let mut pgid: Option<Pid> = None;
    for local in 0..processes {
        let env = process_env(spec, workdir, agent_env.iter().cloned(), local);
        let mut cmd = command(spec, workdir, &env, checkpoint_signal);
        let spawned = out_w
            .try_clone()
            .and_then(|o| Ok((o, err_w.try_clone()?)))
            .and_then(|(o, e)| {
                cmd.stdout(o).stderr(e).process_group(pgid.map_or(0, Pid::as_raw));
                cmd.spawn()
            })
            .map_err(spawn_err)
            .and_then(|child| Ok((child_pid(&child, &program)?, child)));
        match spawned {
            Ok((pid, child)) => {
                pgid.get_or_insert(pid);
                children.push(child);
            }
            Err(e) => {
                if let Some(g) = pgid {
                    signal_group(g, Signal::SIGKILL);
                }
                return Err(e);
            }
        }
    }
    // Only the children hold the write ends now: the readers see the end when all have exited.
    drop((out_w, err_w));
    let pid = pgid.ok_or_else(|| spawn_err(std::io::Error::other("no process to start")))?;
    let reader = |r: std::io::PipeReader| -> Option<Output> {
        match tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(r)) {
            Ok(rx) => Some(Box::new(rx)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shard's output pipe");
                None
            }
        }
    };
    Ok(Started { pid, children, out: reader(out_r), err: reader(err_r) })
}

/// Waits for every process the agent started. The attempt's exit is the first failure, and
/// once one process failed the rest of the attempt is killed; otherwise (all exited 0) success.
async fn wait_all(children: Vec<tokio::process::Child>, pgid: Pid, marker: &[u8]) -> ExitInfo {
    let mut waits = tokio::task::JoinSet::new();
    for mut child in children {
        waits.spawn(async move { child.wait().await });
    }
    let (mut first_failure, mut last) = (None, ExitInfo::default());
    while let Some(joined) = waits.join_next().await {
        let info = match joined {
            Ok(Ok(status)) => ExitInfo::from_status(status),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "waiting for the shard failed");
                ExitInfo::default()
            }
            Err(e) => {
                tracing::error!(error = %e, "the task waiting for the shard failed");
                ExitInfo::default()
            }
        };
        if !info.success() && first_failure.is_none() {
            first_failure = Some(info);
            if !waits.is_empty() {
                tracing::warn!(%info, "a process of the shard failed; killing the others");
                signal_attempt(pgid, marker, Signal::SIGKILL);
            }
        }
        last = info;
    }
    first_failure.unwrap_or(last)
}

/// An attempt's working directory under the agent's `work_root`.
pub fn attempt_dir(work_root: &Path, job: u64, shard: u32, attempt: u64) -> PathBuf {
    work_root.join(format!("job-{job}")).join(format!("shard-{shard}")).join(format!("attempt-{attempt}"))
}

/// `TESSERA_PROGRESS_FILE=<path>`, as it stands in the environment of the attempt's processes.
fn marker(progress_path: &Path) -> Vec<u8> {
    format!("TESSERA_PROGRESS_FILE={}", progress_path.to_string_lossy()).into_bytes()
}

impl Shard {
    /// Starts the attempt. Must be called inside a tokio runtime.
    pub fn spawn(spec: LaunchSpec) -> Result<Shard, ShardError> {
        let checkpoint_signal = validate(&spec)?;
        let span =
            tracing::info_span!("shard", job_id = spec.job_id, shard = spec.shard_index, attempt_id = spec.attempt_id);
        let rel = spec.workdir();
        let workdir = std::path::absolute(&rel).map_err(|source| ShardError::Workdir { path: rel.clone(), source })?;
        let wd_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ShardError::Workdir { path, source }
        };
        std::fs::create_dir_all(&workdir).map_err(wd_err(&workdir))?;
        if spec.checkpoint_dir.is_none() {
            let dir = workdir.join("checkpoints");
            std::fs::create_dir_all(&dir).map_err(wd_err(&dir))?;
        }
        let progress_path = workdir.join("progress.jsonl");
        std::fs::File::create(&progress_path).map_err(wd_err(&progress_path))?;
        let stdout_path = workdir.join("stdout.log");
        let stdout_file = std::fs::File::create(&stdout_path).map_err(wd_err(&stdout_path))?;
        let stderr_path = workdir.join("stderr.log");
        let stderr_file = std::fs::File::create(&stderr_path).map_err(wd_err(&stderr_path))?;

        let agent_env: Vec<(String, String)> =
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
        let program = spec.command[0].clone();
        let processes = spec.processes();
        let started = if processes <= 1 {
            let env = launch_env(&spec, &workdir, agent_env);
            let mut cmd = command(&spec, &workdir, &env, checkpoint_signal);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
            let mut child = cmd.spawn().map_err(|source| ShardError::Spawn { program: program.clone(), source })?;
            let pid = child_pid(&child, &program)?;
            let out = child.stdout.take().map(|o| Box::new(o) as Output);
            let err = child.stderr.take().map(|e| Box::new(e) as Output);
            Started { pid, children: vec![child], out, err }
        } else {
            spawn_per_gpu(&spec, &workdir, &agent_env, checkpoint_signal, processes)?
        };
        let Started { pid, children, out, err } = started;
        let raw_pid = pid.as_raw();
        span.in_scope(
            || tracing::info!(pid = raw_pid, processes, workdir = %workdir.display(), ?program, "shard started"),
        );
        // So that an agent restarted after a crash finds and kills what this one left running.
        let pid_file = workdir.join(PID_FILE);
        if let Err(e) = std::fs::write(&pid_file, raw_pid.to_string()) {
            span.in_scope(|| tracing::warn!(error = %e, "cannot write the shard's pid file"));
        }
        let marker = marker(&progress_path);

        let mut copiers = Vec::new();
        if let Some(out) = out {
            copiers.push(tokio::spawn(
                logs::copy_rotating(out, stdout_file, StreamFiles::new(stdout_path), "stdout", spec.log_cap_bytes)
                    .instrument(span.clone()),
            ));
        }
        if let Some(err) = err {
            copiers.push(tokio::spawn(
                logs::copy_rotating(err, stderr_file, StreamFiles::new(stderr_path), "stderr", spec.log_cap_bytes)
                    .instrument(span.clone()),
            ));
        }

        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        let (ckpt_tx, ckpt_rx) = mpsc::unbounded_channel();
        let (finish_tx, finish_rx) = oneshot::channel();
        let tailer =
            tokio::spawn(progress::tail(progress_path, progress_tx, ckpt_tx, finish_rx).instrument(span.clone()));

        let (leader_tx, leader_rx) = watch::channel(None);
        let (exit_tx, exit_rx) = watch::channel(None);
        let sweep = marker.clone();
        tokio::spawn(
            async move {
                let info = wait_all(children, pid, &sweep).await;
                leader_tx.send_replace(Some(info));
                // Whatever is left of the attempt goes with its processes.
                signal_attempt(pid, &sweep, Signal::SIGKILL);
                let _ = std::fs::remove_file(&pid_file);
                let finish = async {
                    for c in copiers {
                        let _ = c.await;
                    }
                    let _ = finish_tx.send(());
                    let _ = tailer.await;
                };
                if tokio::time::timeout(FINISH_TIMEOUT, finish).await.is_err() {
                    tracing::warn!("shard output still open after its group was killed; reporting the exit anyway");
                }
                tracing::info!(%info, "shard exited");
                exit_tx.send_replace(Some(info));
            }
            .instrument(span.clone()),
        );

        Ok(Shard {
            spec,
            workdir,
            pid,
            marker,
            checkpoint_signal,
            leader: leader_rx,
            exit: exit_rx,
            progress: progress_rx,
            checkpoints: Mutex::new(Some(ckpt_rx)),
            stop_started: AtomicBool::new(false),
            span,
        })
    }

    pub fn spec(&self) -> &LaunchSpec {
        &self.spec
    }

    /// The attempt's working directory (absolute).
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Pid of the group's leader, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.workdir.join("stdout.log")
    }

    /// The attempt's stdout (1) or stderr (2), as kept on disk.
    pub fn stream(&self, stream: i32) -> StreamFiles {
        StreamFiles::new(if stream == 2 { self.stderr_path() } else { self.stdout_path() })
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.workdir.join("stderr.log")
    }

    pub fn progress_path(&self) -> PathBuf {
        self.workdir.join("progress.jsonl")
    }

    /// The latest progress.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Changes of progress, for `changed()` in a select.
    pub fn progress_watch(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// The stream of new checkpoints, each once, in order; it closes after the shard exited and its
    /// progress file was read to the end. `Some` only on the first call; afterwards (or instead)
    /// use [`Self::new_checkpoints`], which then returns nothing.
    pub fn take_checkpoints(&self) -> Option<mpsc::UnboundedReceiver<CheckpointReport>> {
        self.checkpoints.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The checkpoints reported since the last call, as (step, uri), each once, in order, without
    /// waiting. Empty once [`Self::take_checkpoints`] took the stream.
    pub fn new_checkpoints(&self) -> Vec<(u64, String)> {
        let mut guard = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if let Some(rx) = guard.as_mut() {
            while let Ok(r) = rx.try_recv() {
                out.push((r.step, r.uri));
            }
        }
        out
    }

    /// `Some` once the shard has exited (and logs and progress are complete).
    pub fn try_exit(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Watch of the exit, for a select: `None` while running.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// Waits for the shard to exit. By then no process of its group is left, its logs are
    /// flushed and its progress file is read to the end.
    pub async fn wait(&self) -> ExitInfo {
        wait_set(self.exit.clone()).await
    }

    /// Sends the checkpoint signal to the group (a spot notice). False when the signal is "none"
    /// or the shard has exited.
    pub fn checkpoint_now(&self) -> bool {
        let Some(sig) = self.checkpoint_signal else { return false };
        if self.leader.borrow().is_some() {
            return false;
        }
        self.span.in_scope(|| tracing::info!(signal = sig.as_str(), "asking the shard for a checkpoint"));
        signal_attempt(self.pid, &self.marker, sig)
    }

    /// Starts the stop ladder unless it has started already, without waiting. It runs in a task
    /// of its own, so it goes on even if the caller stops caring.
    pub fn request_stop(&self) {
        if self.stop_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let ladder = Ladder {
            pid: self.pid,
            marker: self.marker.clone(),
            checkpoint_signal: self.checkpoint_signal,
            checkpoint_grace: self.spec.checkpoint_grace,
            term_grace: self.spec.term_grace,
            leader: self.leader.clone(),
        };
        tokio::spawn(ladder.run().instrument(self.span.clone()));
    }

    /// Kills the whole group at once, with no checkpoint and no grace: for a shard the
    /// scheduler may already be running elsewhere (self-fencing, forgotten attempts).
    pub fn kill_now(&self) {
        self.stop_started.store(true, Ordering::SeqCst);
        if self.leader.borrow().is_none() {
            self.span.in_scope(|| tracing::warn!("killing the shard's group now"));
            signal_attempt(self.pid, &self.marker, Signal::SIGKILL);
        }
    }

    /// Stops the shard: checkpoint signal (unless "none"), up to `checkpoint_grace`, SIGTERM, up
    /// to `term_grace`, SIGKILL, each to the whole group. Runs the ladder once however often it
    /// is called; every call returns the exit.
    pub async fn stop(&self) -> ExitInfo {
        self.request_stop();
        self.wait().await
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if self.leader.borrow().is_none() {
            self.span.in_scope(|| tracing::warn!("shard dropped while running; killing its group"));
            signal_attempt(self.pid, &self.marker, Signal::SIGKILL);
        }
    }
}

async fn wait_set(mut rx: watch::Receiver<Option<ExitInfo>>) -> ExitInfo {
    let found = rx.wait_for(Option::is_some).await.ok().and_then(|v| *v);
    // Without a value the supervisor is gone (runtime shutting down): report what is known.
    found.or_else(|| *rx.borrow()).unwrap_or_default()
}

/// The file in an attempt's working directory that holds its process group id while it runs.
const PID_FILE: &str = "pid";

/// Kill the process groups of attempts that an earlier agent left running under `work_root`
/// (it crashed or was killed; a systemd unit's control-group kill does the same). A group is
/// killed only if its leader still runs in that attempt's directory, so a reused pid is never
/// hit. Returns how many groups were killed.
pub fn kill_leftovers(work_root: &Path) -> usize {
    let mut killed = 0;
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default()
    };
    for job in dirs(work_root).iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("job-")))
    {
        for shard in dirs(job) {
            for attempt in dirs(&shard) {
                let file = attempt.join(PID_FILE);
                let Some(pid) = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<i32>().ok()) else {
                    continue;
                };
                let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
                let here = std::fs::canonicalize(&attempt).ok();
                if pid > 1 && cwd.is_some() && cwd == here && signal_group(Pid::from_raw(pid), Signal::SIGKILL) {
                    tracing::warn!(pid, dir = %attempt.display(), "killed a shard an earlier agent left running");
                    killed += 1;
                }
                let _ = std::fs::remove_file(&file);
            }
        }
    }
    killed
}

/// Signals the attempt: its process group, and every process that left the group but carries
/// the attempt's `marker` in its environment (torchrun starts each worker in a session of its
/// own; a process that calls `setsid` leaves too). False when nothing was signalled.
fn signal_attempt(pgid: Pid, marker: &[u8], sig: Signal) -> bool {
    let mut any = signal_group(pgid, sig);
    for pid in escaped(pgid, marker) {
        any |= kill(pid, sig).is_ok();
    }
    any
}

/// Processes outside the group `pgid` whose environment holds `marker` exactly.
fn escaped(pgid: Pid, marker: &[u8]) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p > 1 && u32::try_from(p).is_ok_and(|p| p != me))
        .map(Pid::from_raw)
        .filter(|&p| getpgid(Some(p)).is_ok_and(|g| g != pgid))
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker))
        })
        .collect()
}

/// Signals the process group; false when it no longer exists.
fn signal_group(pgid: Pid, sig: Signal) -> bool {
    match killpg(pgid, sig) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(e) => {
            tracing::warn!(signal = sig.as_str(), error = %e, "signalling the shard's group failed");
            false
        }
    }
}

struct Ladder {
    pid: Pid,
    marker: Vec<u8>,
    checkpoint_signal: Option<Signal>,
    checkpoint_grace: Duration,
    term_grace: Duration,
    leader: watch::Receiver<Option<ExitInfo>>,
}

impl Ladder {
    /// Runs the ladder; its timing comes from [`StopLadder`].
    async fn run(self) {
        let mut ladder = StopLadder::new(self.checkpoint_signal.is_some(), self.checkpoint_grace, self.term_grace);
        while let Some(step) = ladder.next(std::time::Instant::now(), self.exited()) {
            let (sig, grace) = match step.rung {
                Rung::Checkpoint => (self.checkpoint_signal, self.checkpoint_grace),
                Rung::Term => (Some(Signal::SIGTERM), self.term_grace),
                Rung::Kill => {
                    tracing::warn!("shard still running after its graces; SIGKILL");
                    signal_attempt(self.pid, &self.marker, Signal::SIGKILL);
                    return;
                }
            };
            // The ladder has a checkpoint rung only when there is a signal.
            let Some(sig) = sig else { continue };
            tracing::info!(signal = sig.as_str(), grace_ms = grace.as_millis() as u64, "stopping shard");
            signal_attempt(self.pid, &self.marker, sig);
            if let Some(until) = step.wait_until
                && tokio::time::timeout_at(until.into(), wait_set(self.leader.clone())).await.is_ok()
            {
                return;
            }
        }
    }

    fn exited(&self) -> bool {
        self.leader.borrow().is_some()
    }
}
