//! Job specifications: the validated [`JobSpec`], its TOML form (errors name the field and the
//! line), and the one-line form of `tessera job submit --shards .. --gpus .. -- CMD`.
//!
//! Every way a spec enters Tessera (TOML file, one-line flags, the gRPC API, a replayed Raft
//! entry) ends in [`JobSpec::validate`], so the bounds below hold for every job in the state.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Upper bounds on every size a spec can carry. They keep one hostile or mistaken spec from
/// exhausting the servers' memory or the Raft log.
pub mod limits {
    /// Shards (nodes) in one job.
    pub const MAX_SHARDS: u32 = 4096;
    /// GPUs per shard; also the most GPUs one node may have.
    pub const MAX_GPUS_PER_SHARD: u32 = 64;
    /// Length of the job name.
    pub const MAX_NAME_LEN: usize = 128;
    /// Length of a tenant name.
    pub const MAX_TENANT_LEN: usize = 64;
    /// Arguments in the command.
    pub const MAX_COMMAND_ARGS: usize = 1024;
    /// Total bytes of the command (all arguments together).
    pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
    /// Environment variables.
    pub const MAX_ENV_VARS: usize = 256;
    /// Total bytes of the environment (names and values together).
    pub const MAX_ENV_BYTES: usize = 64 * 1024;
    /// Label selectors, regions or clouds in a placement.
    pub const MAX_LIST_ITEMS: usize = 64;
    /// Length of a label key or value, a region name or a GPU model.
    pub const MAX_SHORT_STRING: usize = 128;
    /// Length of the checkpoint directory URI.
    pub const MAX_URI_LEN: usize = 4096;
    /// Highest priority; priorities run from 0 to this.
    pub const MAX_PRIORITY: u16 = 1000;
    /// Longest declared runtime: 365 days, in seconds.
    pub const MAX_RUNTIME_SECS: u64 = 365 * 24 * 3600;
    /// Shortest progress timeout: a few heartbeats' worth.
    pub const MIN_PROGRESS_TIMEOUT_SECS: u64 = 10;
    /// Most attempts the retry policy may allow.
    pub const MAX_ATTEMPTS: u32 = 100;
    /// Longest retry backoff: one day, in seconds.
    pub const MAX_BACKOFF_SECS: u64 = 24 * 3600;
    /// Most CPU a shard may ask for, in millicores (4096 cores).
    pub const MAX_CPU_MILLIS: u64 = 4096 * 1000;
    /// Most memory a shard may ask for, in MiB (64 TiB).
    pub const MAX_MEMORY_MIB: u64 = 64 * 1024 * 1024;
    /// Most GPU memory a shard may ask for per GPU, in MiB (1 TiB).
    pub const MAX_GPU_MEMORY_MIB: u64 = 1024 * 1024;
    /// Exit codes listed as never retried.
    pub const MAX_EXIT_CODES: usize = 64;
    /// Elements of one job array.
    pub const MAX_ARRAY_SIZE: u64 = 1_000_000;
    /// Highest index of a job array element.
    pub const MAX_ARRAY_INDEX: u32 = 100_000_000;
    /// Comma-separated parts of an array's index list.
    pub const MAX_ARRAY_RANGES: usize = 1024;
    /// Jobs a job may depend on (`after_ok` and `after_any` together).
    pub const MAX_DEPENDENCIES: usize = 64;
}

/// Named priority levels. Any integer from 0 to [`limits::MAX_PRIORITY`] is also accepted.
pub const PRIORITY_NAMES: [(&str, u16); 4] = [("low", 250), ("normal", 500), ("high", 750), ("critical", 1000)];

/// The default priority, "normal".
pub const DEFAULT_PRIORITY: u16 = 500;

/// Tenant used when a spec names none.
pub const DEFAULT_TENANT: &str = "default";

/// A cloud a node runs in, or `none` for hosts outside any cloud (a lab rack, a laptop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    /// Amazon Web Services.
    Aws,
    /// Microsoft Azure.
    Azure,
    /// Not in a cloud.
    None,
}

impl Cloud {
    /// The lowercase name used in specs, flags and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Azure => "azure",
            Cloud::None => "none",
        }
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Cloud {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "aws" => Ok(Cloud::Aws),
            "azure" => Ok(Cloud::Azure),
            "none" => Ok(Cloud::None),
            other => Err(format!("unknown cloud '{other}' (expected aws, azure or none)")),
        }
    }
}

/// How a job treats spot (preemptible) capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpotPolicy {
    /// On-demand nodes only; never spot.
    Avoid,
    /// Spot or on-demand, whichever fits better (and costs less).
    #[default]
    Allow,
    /// Spot nodes first; on-demand only when no spot capacity fits.
    Prefer,
    /// Spot nodes only.
    Require,
}

impl SpotPolicy {
    /// The lowercase name used in specs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SpotPolicy::Avoid => "avoid",
            SpotPolicy::Allow => "allow",
            SpotPolicy::Prefer => "prefer",
            SpotPolicy::Require => "require",
        }
    }
}

impl std::str::FromStr for SpotPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "avoid" => Ok(SpotPolicy::Avoid),
            "allow" => Ok(SpotPolicy::Allow),
            "prefer" => Ok(SpotPolicy::Prefer),
            "require" => Ok(SpotPolicy::Require),
            other => Err(format!("unknown spot policy '{other}' (expected avoid, allow, prefer or require)")),
        }
    }
}

/// How the agent starts a shard's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaunchMode {
    /// One process per shard (the command, often `torchrun`, starts the per-GPU workers itself):
    /// `RANK` = `NODE_RANK` = shard index, `WORLD_SIZE` = shards, and the `PET_*` variables
    /// that make a bare `torchrun train.py` join the gang.
    #[default]
    Process,
    /// One process per GPU of the shard, started by the agent: `RANK` = shard x GPUs + local
    /// index, `LOCAL_RANK` = local index, `WORLD_SIZE` = shards x GPUs.
    PerGpu,
}

impl LaunchMode {
    /// The name used in specs, flags and the API: "process" or "per-gpu".
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchMode::Process => "process",
            LaunchMode::PerGpu => "per-gpu",
        }
    }

    /// Processes one shard with `gpus` GPUs runs (at least 1).
    pub fn processes_per_shard(self, gpus: u32) -> u32 {
        match self {
            LaunchMode::Process => 1,
            LaunchMode::PerGpu => gpus.max(1),
        }
    }
}

impl fmt::Display for LaunchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LaunchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "process" => Ok(LaunchMode::Process),
            "per-gpu" => Ok(LaunchMode::PerGpu),
            other => Err(format!("unknown launch mode '{other}' (expected process or per-gpu)")),
        }
    }
}

/// What one shard needs from the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// GPUs per shard (1 to [`limits::MAX_GPUS_PER_SHARD`]); all on the same node.
    pub gpus: u32,
    /// GPU model the shard needs, matched against the node's model name by whole words,
    /// ignoring case: "H100" matches "NVIDIA H100 80GB HBM3". None: any model.
    pub gpu_model: Option<String>,
    /// Least memory each GPU must have, in MiB. 0: no minimum.
    pub min_gpu_memory_mib: u64,
    /// CPU the shard needs, in millicores. 0: no CPU reservation.
    pub cpu_millis: u64,
    /// Host memory the shard needs, in MiB. 0: no memory reservation.
    pub memory_mib: u64,
}

/// Where a job may run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Placement {
    /// Clouds the job may use; empty: any cloud.
    pub clouds: Vec<Cloud>,
    /// Regions the job may use; empty: any region.
    pub regions: Vec<String>,
    /// Node labels the job requires (every key with exactly this value).
    pub labels: BTreeMap<String, String>,
    /// How spot capacity is treated.
    pub spot: SpotPolicy,
    /// May one job's shards sit in several regions of one cloud? Default no.
    pub span_regions: bool,
    /// May one job's shards sit in several clouds? Default no. Implies span_regions.
    pub span_clouds: bool,
}

/// What happens when a shard fails.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts the job may make in all, counting failures of its own code only (lost nodes,
    /// preemption and drains do not count). 1: never retry.
    pub max_attempts: u32,
    /// Seconds to wait before placing a failed gang again.
    pub backoff_secs: u64,
    /// Exit codes that mean "do not retry": the job fails at once.
    pub never_retry_exit_codes: Vec<i32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 3, backoff_secs: 10, never_retry_exit_codes: Vec::new() }
    }
}

/// How the agent stops a shard: the checkpoint signal, a grace period, SIGTERM, a second grace
/// period, then SIGKILL for the whole process group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StopPolicy {
    /// Signal that asks the shard to checkpoint now, like "SIGUSR1"; "none" skips it.
    pub signal: String,
    /// Seconds between the checkpoint signal and SIGTERM.
    pub checkpoint_grace_secs: u64,
    /// Seconds between SIGTERM and SIGKILL.
    pub term_grace_secs: u64,
}

impl Default for StopPolicy {
    fn default() -> Self {
        StopPolicy { signal: "SIGUSR1".into(), checkpoint_grace_secs: 60, term_grace_secs: 30 }
    }
}

/// Signals a spec may name as its checkpoint signal.
pub const CHECKPOINT_SIGNALS: [&str; 6] = ["SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGTERM", "none"];

/// A validated job specification.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human-readable name; `[A-Za-z0-9._-]`, 1 to 128 characters.
    pub name: String,
    /// Tenant the job's GPU-hours are charged to (fair share and quotas).
    pub tenant: String,
    /// The command each shard runs, as argv.
    pub command: Vec<String>,
    /// Extra environment variables for every shard.
    pub env: BTreeMap<String, String>,
    /// Number of shards (nodes); all placed at once or not at all.
    pub shards: u32,
    /// Per-shard resources.
    pub resources: Resources,
    /// Placement constraints.
    pub placement: Placement,
    /// 0 (lowest) to 1000 (highest).
    pub priority: u16,
    /// Declared maximum runtime in seconds, if any; lets the job backfill.
    pub max_runtime_secs: Option<u64>,
    /// A running shard that reports no new progress step for this long is stalled (a hang,
    /// like a NCCL deadlock): its gang restarts from the checkpoint. None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_timeout_secs: Option<u64>,
    /// How the agent starts each shard's processes; default one process per shard.
    #[serde(default, skip_serializing_if = "is_process")]
    pub launch: LaunchMode,
    /// Where the job writes checkpoints (a path or URI), passed as `TESSERA_CHECKPOINT_DIR`.
    pub checkpoint_dir: Option<String>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// How shards are stopped (preemption, drain, spot notice, cancel).
    pub stop: StopPolicy,
    /// A job array: one job of this spec per index (see [`ArraySpec`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArraySpec>,
    /// Jobs (ids) that must all succeed before this one is placed; if one ends otherwise, this
    /// job is cancelled ("dependency never satisfied").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_ok: Vec<u64>,
    /// Jobs (ids) that must all end, however, before this one is placed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_any: Vec<u64>,
}

/// A job array, Slurm's `--array` form: `0-999%50` is indices 0 to 999, at most 50 of them
/// running at once; `1,3,8-20:4` lists indices and ranges with a step. Each index becomes a job
/// of its own (an element) with `TESSERA_ARRAY_INDEX` set, created as the limit allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArraySpec {
    /// (first, last, step) parts in increasing order, none overlapping the one before.
    pub ranges: Vec<(u32, u32, u32)>,
    /// At most this many elements exist unfinished (pending or running) at once; None: no
    /// limit beyond the servers' own window of waiting elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
}

impl ArraySpec {
    /// Parse `0-999%50`, `1,3,8-20:4`, `7`. Errors say what is wrong with which part.
    pub fn parse(s: &str) -> Result<ArraySpec, String> {
        let t = s.trim();
        let (list, limit) = match t.split_once('%') {
            Some((l, m)) => (l, Some(m)),
            None => (t, None),
        };
        let max_running = match limit {
            None => None,
            Some(m) => match m.trim().parse::<u32>() {
                Ok(n) if n >= 1 => Some(n),
                _ => return Err(format!("'%{m}' is not a limit: use %N with N at least 1, like 0-999%50")),
            },
        };
        if list.trim().is_empty() {
            return Err(format!("'{s}' lists no indices: use a form like 0-999%50 or 1,3,8-20:4"));
        }
        let num = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| format!("'{x}' in '{s}' is not an index: use a form like 0-999%50 or 1,3,8-20:4"))
        };
        let mut ranges = Vec::new();
        for part in list.split(',') {
            let (span, step) = match part.split_once(':') {
                Some((r, st)) => (r, num(st)?),
                None => (part, 1),
            };
            let (first, last) = match span.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let i = num(span)?;
                    (i, i)
                }
            };
            ranges.push((first, last, step));
        }
        let spec = ArraySpec { ranges, max_running };
        spec.check()?;
        Ok(spec)
    }

    /// The rules [`ArraySpec::parse`] enforces, for a spec that came another way.
    pub fn check(&self) -> Result<(), String> {
        if self.ranges.is_empty() {
            return Err("lists no indices".into());
        }
        if self.ranges.len() > limits::MAX_ARRAY_RANGES {
            return Err(format!("has {} parts; at most {} allowed", self.ranges.len(), limits::MAX_ARRAY_RANGES));
        }
        let mut prev: Option<u32> = None;
        for &(first, last, step) in &self.ranges {
            if step == 0 {
                return Err(format!("{first}-{last}:0 has a step of 0"));
            }
            if first > last {
                return Err(format!("{first}-{last} runs backwards"));
            }
            if last > limits::MAX_ARRAY_INDEX {
                return Err(format!("index {last} is above the highest allowed, {}", limits::MAX_ARRAY_INDEX));
            }
            if let Some(p) = prev
                && first <= p
            {
                return Err(format!("{first} comes after {p}: list the parts in increasing order, without overlap"));
            }
            prev = Some(last);
        }
        if self.max_running == Some(0) {
            return Err("%0 would never run an element".into());
        }
        let n = self.len();
        if n > limits::MAX_ARRAY_SIZE {
            return Err(format!("has {n} elements; at most {} allowed", limits::MAX_ARRAY_SIZE));
        }
        Ok(())
    }

    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(f, l, st)| u64::from(l.saturating_sub(f) / st.max(1)) + 1).sum()
    }

    /// Always false: an array has at least one element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index of the `pos`-th element (from 0), in order.
    pub fn index_at(&self, mut pos: u64) -> Option<u32> {
        for &(first, last, step) in &self.ranges {
            let step = step.max(1);
            let n = u64::from(last.saturating_sub(first) / step) + 1;
            if pos < n {
                return u32::try_from(u64::from(first) + pos * u64::from(step)).ok();
            }
            pos -= n;
        }
        None
    }
}

impl fmt::Display for ArraySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(first, last, step)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match (first == last, step) {
                (true, _) => write!(f, "{first}")?,
                (false, 1) => write!(f, "{first}-{last}")?,
                (false, st) => write!(f, "{first}-{last}:{st}")?,
            }
        }
        if let Some(m) = self.max_running {
            write!(f, "%{m}")?;
        }
        Ok(())
    }
}

/// Parse a job reference: `12` or `job-12`.
pub fn parse_job_ref(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.strip_prefix("job-").unwrap_or(t);
    match digits.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a job id: use a number like 12 or job-12")),
    }
}

/// One problem with a spec: which field, what is wrong, and where in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, like `resources.gpus`, or a flag like `--gpus`.
    pub field: String,
    /// What is wrong and what would be right.
    pub message: String,
    /// 1-based line and column in the TOML source, when the spec came from a file.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, column)) = self.location {
            write!(f, "line {line}, column {column}: ")?;
        }
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A spec that could not be accepted: every problem found, in source order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The problems, at least one.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "invalid job spec ({n} {}):", if n == 1 { "problem" } else { "problems" })?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl SpecError {
    fn one(field: &str, message: impl Into<String>) -> Self {
        SpecError { errors: vec![FieldError { field: field.into(), message: message.into(), location: None }] }
    }
}

fn is_process(mode: &LaunchMode) -> bool {
    *mode == LaunchMode::Process
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn check_short(errs: &mut Vec<FieldError>, field: &str, value: &str) {
    if value.is_empty() {
        push(errs, field, "must not be empty");
    } else if value.len() > limits::MAX_SHORT_STRING {
        push(errs, field, format!("is {} bytes; at most {} allowed", value.len(), limits::MAX_SHORT_STRING));
    } else if value.chars().any(|c| c.is_control()) {
        push(errs, field, "must not contain control characters");
    }
}

fn push(errs: &mut Vec<FieldError>, field: &str, message: impl Into<String>) {
    errs.push(FieldError { field: field.into(), message: message.into(), location: None });
}

impl JobSpec {
    /// A spec with defaults for everything but the command, shard count and GPUs per shard.
    pub fn new(command: Vec<String>, shards: u32, gpus: u32) -> JobSpec {
        JobSpec {
            name: default_name(&command),
            tenant: DEFAULT_TENANT.into(),
            command,
            env: BTreeMap::new(),
            shards,
            resources: Resources { gpus, gpu_model: None, min_gpu_memory_mib: 0, cpu_millis: 0, memory_mib: 0 },
            placement: Placement::default(),
            priority: DEFAULT_PRIORITY,
            max_runtime_secs: None,
            progress_timeout_secs: None,
            launch: LaunchMode::Process,
            checkpoint_dir: None,
            retry: RetryPolicy::default(),
            stop: StopPolicy::default(),
            array: None,
            after_ok: Vec::new(),
            after_any: Vec::new(),
        }
    }

    /// GPUs the whole job holds when all its shards run.
    pub fn total_gpus(&self) -> u64 {
        u64::from(self.shards) * u64::from(self.resources.gpus)
    }

    /// Check every bound and rule. Field paths are those of the TOML form.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut e = Vec::new();
        if self.name.is_empty() || self.name.len() > limits::MAX_NAME_LEN {
            push(&mut e, "name", format!("must be 1 to {} characters", limits::MAX_NAME_LEN));
        } else if !self.name.chars().all(is_name_char) {
            push(&mut e, "name", "may contain only letters, digits, '.', '_' and '-'");
        }
        if self.tenant.is_empty() || self.tenant.len() > limits::MAX_TENANT_LEN {
            push(&mut e, "tenant", format!("must be 1 to {} characters", limits::MAX_TENANT_LEN));
        } else if !self.tenant.chars().all(is_name_char) {
            push(&mut e, "tenant", "may contain only letters, digits, '.', '_' and '-'");
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            push(&mut e, "command", "must name a program to run");
        } else if self.command.len() > limits::MAX_COMMAND_ARGS {
            push(
                &mut e,
                "command",
                format!("has {} arguments; at most {} allowed", self.command.len(), limits::MAX_COMMAND_ARGS),
            );
        } else if self.command.iter().map(String::len).sum::<usize>() > limits::MAX_COMMAND_BYTES {
            push(&mut e, "command", format!("is longer than {} bytes", limits::MAX_COMMAND_BYTES));
        } else if self.command.iter().any(|a| a.contains('\0')) {
            push(&mut e, "command", "must not contain NUL bytes");
        }
        if self.env.len() > limits::MAX_ENV_VARS {
            push(&mut e, "env", format!("has {} variables; at most {} allowed", self.env.len(), limits::MAX_ENV_VARS));
        } else if self.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > limits::MAX_ENV_BYTES {
            push(&mut e, "env", format!("is larger than {} bytes", limits::MAX_ENV_BYTES));
        }
        for (k, v) in &self.env {
            let field = format!("env.{k}");
            if k.is_empty()
                || k.starts_with(|c: char| c.is_ascii_digit())
                || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                push(&mut e, &field, "a variable name must match [A-Za-z_][A-Za-z0-9_]*");
            } else if k.starts_with("TESSERA_") {
                push(&mut e, &field, "names starting with TESSERA_ are set by Tessera itself");
            } else if v.contains('\0') {
                push(&mut e, &field, "must not contain NUL bytes");
            }
        }
        if self.shards == 0 || self.shards > limits::MAX_SHARDS {
            push(&mut e, "shards", format!("must be between 1 and {} (got {})", limits::MAX_SHARDS, self.shards));
        }
        let r = &self.resources;
        if r.gpus == 0 || r.gpus > limits::MAX_GPUS_PER_SHARD {
            let why = match self.launch {
                LaunchMode::PerGpu => "; launch = \"per-gpu\" starts one process per GPU",
                LaunchMode::Process => "",
            };
            push(
                &mut e,
                "resources.gpus",
                format!("must be between 1 and {} (got {}){why}", limits::MAX_GPUS_PER_SHARD, r.gpus),
            );
        }
        if let Some(m) = &r.gpu_model {
            check_short(&mut e, "resources.gpu_model", m);
            if model_tokens(m).is_empty() {
                push(&mut e, "resources.gpu_model", "must contain a letter or digit");
            }
        }
        if r.min_gpu_memory_mib > limits::MAX_GPU_MEMORY_MIB {
            push(&mut e, "resources.min_gpu_memory_gib", "is larger than 1024 GiB");
        }
        if r.cpu_millis > limits::MAX_CPU_MILLIS {
            push(&mut e, "resources.cpu", "is more than 4096 cores");
        }
        if r.memory_mib > limits::MAX_MEMORY_MIB {
            push(&mut e, "resources.memory_gib", "is more than 65536 GiB");
        }
        let p = &self.placement;
        if p.clouds.len() > limits::MAX_LIST_ITEMS {
            push(&mut e, "placement.clouds", "lists too many clouds");
        }
        if p.regions.len() > limits::MAX_LIST_ITEMS {
            push(&mut e, "placement.regions", format!("lists more than {} regions", limits::MAX_LIST_ITEMS));
        }
        for (i, region) in p.regions.iter().enumerate() {
            check_short(&mut e, &format!("placement.regions[{i}]"), region);
        }
        if p.labels.len() > limits::MAX_LIST_ITEMS {
            push(&mut e, "placement.labels", format!("has more than {} labels", limits::MAX_LIST_ITEMS));
        }
        for (k, v) in &p.labels {
            check_short(&mut e, &format!("placement.labels.{k}"), k);
            if v.len() > limits::MAX_SHORT_STRING {
                push(&mut e, &format!("placement.labels.{k}"), "value is too long");
            }
        }
        if self.priority > limits::MAX_PRIORITY {
            push(&mut e, "priority", format!("must be between 0 and {} (got {})", limits::MAX_PRIORITY, self.priority));
        }
        if let Some(rt) = self.max_runtime_secs
            && (rt == 0 || rt > limits::MAX_RUNTIME_SECS)
        {
            push(&mut e, "max_runtime", "must be between 1 second and 365 days");
        }
        if let Some(t) = self.progress_timeout_secs
            && !(limits::MIN_PROGRESS_TIMEOUT_SECS..=limits::MAX_RUNTIME_SECS).contains(&t)
        {
            push(&mut e, "progress_timeout", "must be between 10 seconds and 365 days");
        }
        if let Some(dir) = &self.checkpoint_dir
            && (dir.is_empty() || dir.len() > limits::MAX_URI_LEN || dir.contains('\0'))
        {
            push(&mut e, "checkpoint_dir", format!("must be 1 to {} bytes without NUL", limits::MAX_URI_LEN));
        }
        let rp = &self.retry;
        if rp.max_attempts == 0 || rp.max_attempts > limits::MAX_ATTEMPTS {
            push(
                &mut e,
                "retry.max_attempts",
                format!("must be between 1 and {} (got {})", limits::MAX_ATTEMPTS, rp.max_attempts),
            );
        }
        if rp.backoff_secs > limits::MAX_BACKOFF_SECS {
            push(&mut e, "retry.backoff", "must be at most one day");
        }
        if rp.never_retry_exit_codes.len() > limits::MAX_EXIT_CODES {
            push(&mut e, "retry.never_retry_exit_codes", format!("lists more than {} codes", limits::MAX_EXIT_CODES));
        }
        let st = &self.stop;
        if !CHECKPOINT_SIGNALS.contains(&st.signal.as_str()) {
            push(&mut e, "stop.signal", format!("'{}' is not one of {}", st.signal, CHECKPOINT_SIGNALS.join(", ")));
        }
        if st.checkpoint_grace_secs > 3600 {
            push(&mut e, "stop.checkpoint_grace", "must be at most one hour");
        }
        if st.term_grace_secs > 3600 {
            push(&mut e, "stop.term_grace", "must be at most one hour");
        }
        if let Some(a) = &self.array
            && let Err(m) = a.check()
        {
            push(&mut e, "array", m);
        }
        if self.after_ok.len() + self.after_any.len() > limits::MAX_DEPENDENCIES {
            push(&mut e, "after_ok", format!("more than {} dependencies in all", limits::MAX_DEPENDENCIES));
        }
        for (field, list) in [("after_ok", &self.after_ok), ("after_any", &self.after_any)] {
            if list.contains(&0) {
                push(&mut e, field, "job ids start at 1");
            }
        }
        if e.is_empty() { Ok(()) } else { Err(SpecError { errors: e }) }
    }

    /// Does a GPU with this model name and memory satisfy the spec?
    pub fn gpu_matches(&self, model: &str, memory_mib: u64) -> bool {
        memory_mib >= self.resources.min_gpu_memory_mib
            && self.resources.gpu_model.as_deref().is_none_or(|want| model_matches(want, model))
    }
}

/// A job name derived from the program: `python train.py` gives "train.py"; otherwise the
/// program's file name.
fn default_name(command: &[String]) -> String {
    let pick = match command {
        [prog, script, ..] if is_interpreter(prog) && !script.starts_with('-') => script,
        [prog, ..] => prog,
        [] => return "job".into(),
    };
    let base = pick.rsplit('/').next().unwrap_or(pick);
    let cleaned: String = base.chars().filter(|c| is_name_char(*c)).take(limits::MAX_NAME_LEN).collect();
    if cleaned.is_empty() { "job".into() } else { cleaned }
}

fn is_interpreter(prog: &str) -> bool {
    let base = prog.rsplit('/').next().unwrap_or(prog);
    base.starts_with("python") || matches!(base, "bash" | "sh" | "torchrun" | "node" | "ruby" | "perl")
}

/// Split a GPU model name into upper-case alphanumeric words.
fn model_tokens(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_alphanumeric()).filter(|t| !t.is_empty()).map(|t| t.to_ascii_uppercase()).collect()
}

/// Whole-word, case-insensitive match of a wanted model ("H100", "A100 80GB") in a GPU's
/// model name ("NVIDIA H100 80GB HBM3").
pub fn model_matches(want: &str, have: &str) -> bool {
    let want = model_tokens(want);
    let have = model_tokens(have);
    !want.is_empty() && have.windows(want.len()).any(|w| w == want.as_slice())
}

/// Parse a priority: a name (low, normal, high, critical) or an integer 0..=1000.
pub fn parse_priority(s: &str) -> Result<u16, String> {
    let t = s.trim().to_ascii_lowercase();
    if let Some((_, v)) = PRIORITY_NAMES.iter().find(|(n, _)| *n == t) {
        return Ok(*v);
    }
    match t.parse::<u64>() {
        Ok(v) if v <= u64::from(limits::MAX_PRIORITY) => Ok(v as u16),
        _ => Err(format!(
            "'{s}' is not a priority: use low, normal, high, critical or a number from 0 to {}",
            limits::MAX_PRIORITY
        )),
    }
}

/// Parse a duration: an integer number of seconds, or a string like "90s", "15m", "2h",
/// "1h30m" or "7d".
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("'{s}' is not a duration: use seconds or a form like 90s, 15m, 2h, 1h30m, 7d");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(v) = t.parse::<u64>() {
        return Ok(v);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total = n.checked_mul(unit).and_then(|x| total.checked_add(x)).ok_or_else(bad)?;
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// TOML form
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Option<Spanned<String>>,
    tenant: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    shards: Option<Spanned<i64>>,
    priority: Option<Spanned<toml::Value>>,
    max_runtime: Option<Spanned<toml::Value>>,
    progress_timeout: Option<Spanned<toml::Value>>,
    launch: Option<Spanned<String>>,
    checkpoint_dir: Option<Spanned<String>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    resources: Option<Spanned<RawResources>>,
    placement: Option<Spanned<RawPlacement>>,
    retry: Option<Spanned<RawRetry>>,
    stop: Option<Spanned<RawStop>>,
    array: Option<Spanned<String>>,
    after_ok: Option<Spanned<Vec<toml::Value>>>,
    after_any: Option<Spanned<Vec<toml::Value>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStop {
    signal: Option<Spanned<String>>,
    checkpoint_grace: Option<Spanned<toml::Value>>,
    term_grace: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    gpus: Option<Spanned<i64>>,
    gpu_model: Option<Spanned<String>>,
    min_gpu_memory_gib: Option<Spanned<i64>>,
    cpu: Option<Spanned<f64>>,
    memory_gib: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    clouds: Option<Spanned<Vec<Spanned<String>>>>,
    regions: Option<Spanned<Vec<String>>>,
    labels: Option<Spanned<BTreeMap<String, String>>>,
    spot: Option<Spanned<String>>,
    span_regions: Option<Spanned<bool>>,
    span_clouds: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<toml::Value>>,
    never_retry_exit_codes: Option<Spanned<Vec<i64>>>,
}

/// Maps byte offsets in the source to 1-based (line, column).
struct LineIndex<'a> {
    src: &'a str,
}

impl LineIndex<'_> {
    fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let before = &self.src.as_bytes()[..offset];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = before.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        let column = self.src[line_start..offset].chars().count() + 1;
        (line, column)
    }
}

/// Collects conversion errors and remembers where each field was, so that validation errors
/// found later can be pointed at the right line too.
struct Collector<'a> {
    lines: LineIndex<'a>,
    spans: BTreeMap<String, Range<usize>>,
    errors: Vec<FieldError>,
}

impl Collector<'_> {
    fn at(&mut self, field: &str, span: Range<usize>) {
        self.spans.insert(field.to_string(), span);
    }
    fn err(&mut self, field: &str, span: Range<usize>, message: impl Into<String>) {
        let location = Some(self.lines.locate(span.start));
        self.errors.push(FieldError { field: field.into(), message: message.into(), location });
    }
    /// Location of a field, or of its closest recorded parent (`env.X` falls back to `env`).
    fn locate(&self, field: &str) -> Option<(usize, usize)> {
        let mut f = field;
        loop {
            if let Some(span) = self.spans.get(f) {
                return Some(self.lines.locate(span.start));
            }
            let cut = f.rfind(['.', '['])?;
            f = &f[..cut];
        }
    }
    fn int<T: TryFrom<i64>>(&mut self, field: &str, v: &Spanned<i64>, what: &str) -> Option<T> {
        self.at(field, v.span());
        match T::try_from(*v.get_ref()) {
            Ok(x) => Some(x),
            Err(_) => {
                self.err(field, v.span(), format!("{} is out of range: {what}", v.get_ref()));
                None
            }
        }
    }
    fn duration(&mut self, field: &str, v: &Spanned<toml::Value>) -> Option<u64> {
        self.at(field, v.span());
        let parsed = match v.get_ref() {
            toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
            toml::Value::String(s) => parse_duration_secs(s),
            other => Err(format!("expected seconds or a string like \"2h\", found {}", other.type_str())),
        };
        parsed.map_err(|m| self.err(field, v.span(), m)).ok()
    }
}

/// Parse a TOML job spec. Every error names the field and its line.
///
/// ```toml
/// name = "llama-sft"
/// command = ["python", "train.py"]
/// shards = 4
/// [resources]
/// gpus = 8
/// gpu_model = "H100"
/// ```
pub fn parse_toml(src: &str) -> Result<JobSpec, SpecError> {
    let lines = LineIndex { src };
    let raw: RawSpec = match toml::from_str(src) {
        Ok(raw) => raw,
        Err(err) => {
            let location = err.span().map(|s| lines.locate(s.start));
            let message = err.message().trim().to_string();
            // toml reports the offending key inside the message; the field is the message.
            return Err(SpecError { errors: vec![FieldError { field: "spec".into(), message, location }] });
        }
    };
    let mut c = Collector { lines, spans: BTreeMap::new(), errors: Vec::new() };

    let command = match &raw.command {
        Some(cmd) => {
            c.at("command", cmd.span());
            cmd.get_ref().clone()
        }
        None => {
            c.errors.push(FieldError {
                field: "command".into(),
                message: "is required: the program each shard runs, like [\"python\", \"train.py\"]".into(),
                location: None,
            });
            Vec::new()
        }
    };
    let shards = raw.shards.as_ref().and_then(|v| c.int::<u32>("shards", v, "use 1 to 4096")).unwrap_or(1);
    let mut spec = JobSpec::new(command, shards, 1);

    if let Some(v) = &raw.name {
        c.at("name", v.span());
        spec.name = v.get_ref().clone();
    }
    if let Some(v) = &raw.tenant {
        c.at("tenant", v.span());
        spec.tenant = v.get_ref().clone();
    }
    if let Some(v) = &raw.priority {
        c.at("priority", v.span());
        let parsed = match v.get_ref() {
            toml::Value::Integer(i) => parse_priority(&i.to_string()),
            toml::Value::String(s) => parse_priority(s),
            other => Err(format!("expected a name or a number, found {}", other.type_str())),
        };
        match parsed {
            Ok(p) => spec.priority = p,
            Err(m) => c.err("priority", v.span(), m),
        }
    }
    if let Some(v) = &raw.max_runtime {
        spec.max_runtime_secs = c.duration("max_runtime", v);
    }
    if let Some(v) = &raw.progress_timeout {
        spec.progress_timeout_secs = c.duration("progress_timeout", v);
    }
    if let Some(v) = &raw.launch {
        c.at("launch", v.span());
        match v.get_ref().parse::<LaunchMode>() {
            Ok(m) => spec.launch = m,
            Err(m) => c.err("launch", v.span(), m),
        }
    }
    if let Some(v) = &raw.checkpoint_dir {
        c.at("checkpoint_dir", v.span());
        spec.checkpoint_dir = Some(v.get_ref().clone());
    }
    if let Some(v) = &raw.env {
        c.at("env", v.span());
        spec.env = v.get_ref().clone();
    }
    if let Some(v) = &raw.array {
        c.at("array", v.span());
        match ArraySpec::parse(v.get_ref()) {
            Ok(a) => spec.array = Some(a),
            Err(m) => c.err("array", v.span(), m),
        }
    }
    for (field, raw_list, list) in
        [("after_ok", &raw.after_ok, &mut spec.after_ok), ("after_any", &raw.after_any, &mut spec.after_any)]
    {
        let Some(v) = raw_list else { continue };
        c.at(field, v.span());
        for item in v.get_ref() {
            let parsed = match item {
                toml::Value::Integer(i) => parse_job_ref(&i.to_string()),
                toml::Value::String(s) => parse_job_ref(s),
                other => Err(format!("expected a job id like 12 or \"job-12\", found {}", other.type_str())),
            };
            match parsed {
                Ok(id) => list.push(id),
                Err(m) => c.err(field, v.span(), m),
            }
        }
    }
    if let Some(res) = &raw.resources {
        c.at("resources", res.span());
        let r = res.get_ref();
        if let Some(v) = &r.gpus {
            spec.resources.gpus = c.int("resources.gpus", v, "use 1 to 64").unwrap_or(0);
        }
        if let Some(v) = &r.gpu_model {
            c.at("resources.gpu_model", v.span());
            spec.resources.gpu_model = Some(v.get_ref().clone());
        }
        if let Some(v) = &r.min_gpu_memory_gib {
            let gib: Option<u64> = c.int("resources.min_gpu_memory_gib", v, "use 0 to 1024");
            spec.resources.min_gpu_memory_mib = gib.map_or(0, |g| g.saturating_mul(1024));
        }
        if let Some(v) = &r.cpu {
            c.at("resources.cpu", v.span());
            let cores = *v.get_ref();
            if cores.is_finite() && (0.0..=4096.0).contains(&cores) {
                spec.resources.cpu_millis = (cores * 1000.0).round() as u64;
            } else {
                c.err("resources.cpu", v.span(), format!("{cores} is not a number of cores from 0 to 4096"));
            }
        }
        if let Some(v) = &r.memory_gib {
            let gib: Option<u64> = c.int("resources.memory_gib", v, "use 0 to 65536");
            spec.resources.memory_mib = gib.map_or(0, |g| g.saturating_mul(1024));
        }
    }
    if let Some(pl) = &raw.placement {
        c.at("placement", pl.span());
        let p = pl.get_ref();
        if let Some(list) = &p.clouds {
            c.at("placement.clouds", list.span());
            for (i, cloud) in list.get_ref().iter().enumerate() {
                match cloud.get_ref().parse::<Cloud>() {
                    Ok(cl) if !spec.placement.clouds.contains(&cl) => spec.placement.clouds.push(cl),
                    Ok(_) => {}
                    Err(m) => c.err(&format!("placement.clouds[{i}]"), cloud.span(), m),
                }
            }
        }
        if let Some(v) = &p.regions {
            c.at("placement.regions", v.span());
            spec.placement.regions = v.get_ref().clone();
        }
        if let Some(v) = &p.labels {
            c.at("placement.labels", v.span());
            spec.placement.labels = v.get_ref().clone();
        }
        if let Some(v) = &p.spot {
            match v.get_ref().parse::<SpotPolicy>() {
                Ok(s) => spec.placement.spot = s,
                Err(m) => c.err("placement.spot", v.span(), m),
            }
        }
        if let Some(v) = &p.span_regions {
            spec.placement.span_regions = *v.get_ref();
        }
        if let Some(v) = &p.span_clouds {
            spec.placement.span_clouds = *v.get_ref();
        }
    }
    if let Some(rt) = &raw.retry {
        c.at("retry", rt.span());
        let r = rt.get_ref();
        if let Some(v) = &r.max_attempts {
            spec.retry.max_attempts = c.int("retry.max_attempts", v, "use 1 to 100").unwrap_or(0);
        }
        if let Some(v) = &r.backoff {
            spec.retry.backoff_secs = c.duration("retry.backoff", v).unwrap_or(0);
        }
        if let Some(v) = &r.never_retry_exit_codes {
            c.at("retry.never_retry_exit_codes", v.span());
            let mut codes = Vec::new();
            for code in v.get_ref() {
                match i32::try_from(*code) {
                    Ok(x) => codes.push(x),
                    Err(_) => c.err("retry.never_retry_exit_codes", v.span(), format!("{code} is not an exit code")),
                }
            }
            spec.retry.never_retry_exit_codes = codes;
        }
    }

    if let Some(st) = &raw.stop {
        c.at("stop", st.span());
        let r = st.get_ref();
        if let Some(v) = &r.signal {
            c.at("stop.signal", v.span());
            let sig = v.get_ref().trim().to_ascii_uppercase();
            spec.stop.signal = if sig == "NONE" {
                "none".into()
            } else if sig.starts_with("SIG") {
                sig
            } else {
                format!("SIG{sig}")
            };
        }
        if let Some(v) = &r.checkpoint_grace {
            spec.stop.checkpoint_grace_secs = c.duration("stop.checkpoint_grace", v).unwrap_or(0);
        }
        if let Some(v) = &r.term_grace {
            spec.stop.term_grace_secs = c.duration("stop.term_grace", v).unwrap_or(0);
        }
    }

    if let Err(invalid) = spec.validate() {
        for mut fe in invalid.errors {
            // A field whose conversion already failed has its error; do not report it twice.
            if c.errors.iter().any(|e| e.field == fe.field) {
                continue;
            }
            fe.location = c.locate(&fe.field);
            c.errors.push(fe);
        }
    }
    if c.errors.is_empty() {
        Ok(spec)
    } else {
        c.errors.sort_by_key(|e| e.location.unwrap_or((usize::MAX, 0)));
        Err(SpecError { errors: c.errors })
    }
}

// ---------------------------------------------------------------------------------------------
// One-line form
// ---------------------------------------------------------------------------------------------

/// The one-line form: `tessera job submit --shards 2 --gpus 8 --gpu-model H100 --cloud aws,azure
/// --priority high --name NAME -- CMD ARGS...`. Errors name the flag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OneLine {
    /// `--shards`, default 1.
    pub shards: Option<u32>,
    /// `--gpus` per shard, default 1.
    pub gpus: Option<u32>,
    /// `--gpu-model`.
    pub gpu_model: Option<String>,
    /// `--cloud`, comma-separated.
    pub clouds: Option<String>,
    /// `--priority`, a name or a number.
    pub priority: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--tenant`.
    pub tenant: Option<String>,
    /// `--max-runtime`, a duration like 2h.
    pub max_runtime: Option<String>,
    /// `--progress-timeout`, a duration like 10m.
    pub progress_timeout: Option<String>,
    /// `--launch`, process or per-gpu.
    pub launch: Option<String>,
    /// `--checkpoint-dir`.
    pub checkpoint_dir: Option<String>,
    /// `--env K=V`, repeated.
    pub env: Vec<String>,
    /// `--array`, like `0-999%50`.
    pub array: Option<String>,
    /// `--after-ok`, comma-separated job ids.
    pub after_ok: Option<String>,
    /// `--after-any`, comma-separated job ids.
    pub after_any: Option<String>,
    /// The command after `--`.
    pub command: Vec<String>,
}

impl OneLine {
    /// Build and validate the spec this line describes.
    pub fn to_spec(&self) -> Result<JobSpec, SpecError> {
        let mut spec = JobSpec::new(self.command.clone(), self.shards.unwrap_or(1), self.gpus.unwrap_or(1));
        let mut errors = Vec::new();
        if let Some(m) = &self.gpu_model {
            spec.resources.gpu_model = Some(m.clone());
        }
        if let Some(list) = &self.clouds {
            for part in list.split(',').filter(|p| !p.trim().is_empty()) {
                match part.parse::<Cloud>() {
                    Ok(c) if !spec.placement.clouds.contains(&c) => spec.placement.clouds.push(c),
                    Ok(_) => {}
                    Err(m) => push(&mut errors, "--cloud", m),
                }
            }
        }
        if let Some(p) = &self.priority {
            match parse_priority(p) {
                Ok(p) => spec.priority = p,
                Err(m) => push(&mut errors, "--priority", m),
            }
        }
        if let Some(n) = &self.name {
            spec.name = n.clone();
        }
        if let Some(t) = &self.tenant {
            spec.tenant = t.clone();
        }
        if let Some(d) = &self.checkpoint_dir {
            spec.checkpoint_dir = Some(d.clone());
        }
        if let Some(m) = &self.launch {
            match m.parse::<LaunchMode>() {
                Ok(m) => spec.launch = m,
                Err(m) => push(&mut errors, "--launch", m),
            }
        }
        for kv in &self.env {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    spec.env.insert(k.to_string(), v.to_string());
                }
                _ => push(&mut errors, "--env", format!("'{kv}' is not NAME=VALUE")),
            }
        }
        if let Some(a) = &self.array {
            match ArraySpec::parse(a) {
                Ok(a) => spec.array = Some(a),
                Err(m) => push(&mut errors, "--array", m),
            }
        }
        for (flag, given, list) in
            [("--after-ok", &self.after_ok, &mut spec.after_ok), ("--after-any", &self.after_any, &mut spec.after_any)]
        {
            for part in given.iter().flat_map(|g| g.split(',')).filter(|p| !p.trim().is_empty()) {
                match parse_job_ref(part) {
                    Ok(id) => list.push(id),
                    Err(m) => push(&mut errors, flag, m),
                }
            }
        }
        for (flag, given, field) in [
            ("--max-runtime", &self.max_runtime, &mut spec.max_runtime_secs),
            ("--progress-timeout", &self.progress_timeout, &mut spec.progress_timeout_secs),
        ] {
            if let Some(d) = given {
                match parse_duration_secs(d) {
                    Ok(s) => *field = Some(s),
                    Err(m) => push(&mut errors, flag, m),
                }
            }
        }
        if let Err(invalid) = spec.validate() {
            for mut fe in invalid.errors {
                fe.field = match fe.field.as_str() {
                    "shards" => "--shards".into(),
                    "resources.gpus" => "--gpus".into(),
                    "resources.gpu_model" => "--gpu-model".into(),
                    "name" => "--name".into(),
                    "tenant" => "--tenant".into(),
                    "priority" => "--priority".into(),
                    "max_runtime" => "--max-runtime".into(),
                    "progress_timeout" => "--progress-timeout".into(),
                    "launch" => "--launch".into(),
                    "checkpoint_dir" => "--checkpoint-dir".into(),
                    "array" => "--array".into(),
                    "after_ok" => "--after-ok".into(),
                    "after_any" => "--after-any".into(),
                    f if f.starts_with("env") => "--env".into(),
                    "command" => "command (after --)".into(),
                    other => other.to_string(),
                };
                errors.push(fe);
            }
        }
        if errors.is_empty() { Ok(spec) } else { Err(SpecError { errors }) }
    }
}

/// Error for a spec that fails validation inside the state machine (a replayed or forwarded
/// command whose spec never passed through a parser).
pub(crate) fn invalid_spec(field: &str, message: &str) -> SpecError {
    SpecError::one(field, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "llama-sft"
tenant = "nlp"
command = ["python", "train.py", "--lr", "3e-4"]
shards = 4
priority = "high"
max_runtime = "2h30m"
launch = "per-gpu"
checkpoint_dir = "s3://ckpt/llama"

[env]
NCCL_DEBUG = "INFO"

[resources]
gpus = 8
gpu_model = "H100"
min_gpu_memory_gib = 80
cpu = 96
memory_gib = 1024

[placement]
clouds = ["aws", "azure"]
regions = ["us-east-1", "eastus"]
labels = { fabric = "efa" }
spot = "prefer"

[retry]
max_attempts = 5
backoff = "30s"
never_retry_exit_codes = [2]

[stop]
signal = "usr2"
checkpoint_grace = "2m"
term_grace = 10
"#;

    #[test]
    fn parses_a_full_spec() {
        let s = parse_toml(GOOD).unwrap();
        assert_eq!(s.name, "llama-sft");
        assert_eq!(s.tenant, "nlp");
        assert_eq!(s.shards, 4);
        assert_eq!(s.priority, 750);
        assert_eq!(s.max_runtime_secs, Some(9000));
        assert_eq!(s.resources.gpus, 8);
        assert_eq!(s.resources.min_gpu_memory_mib, 80 * 1024);
        assert_eq!(s.resources.cpu_millis, 96_000);
        assert_eq!(s.placement.clouds, vec![Cloud::Aws, Cloud::Azure]);
        assert_eq!(s.placement.spot, SpotPolicy::Prefer);
        assert_eq!(s.retry.backoff_secs, 30);
        assert_eq!(s.retry.never_retry_exit_codes, vec![2]);
        assert_eq!(s.total_gpus(), 32);
        assert_eq!(s.launch, LaunchMode::PerGpu);
        assert_eq!(s.stop, StopPolicy { signal: "SIGUSR2".into(), checkpoint_grace_secs: 120, term_grace_secs: 10 });
    }

    #[test]
    fn validation_errors_name_field_and_line() {
        let src = "command = [\"x\"]\nshards = 2\n\n[resources]\ngpus = 0\n";
        let err = parse_toml(src).unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        let e = &err.errors[0];
        assert_eq!(e.field, "resources.gpus");
        assert_eq!(e.location.map(|l| l.0), Some(5));
        assert!(err.to_string().contains("line 5"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_types_point_at_their_line() {
        let err = parse_toml("command = [\"x\"]\n[resources]\ngpu = 8\n").unwrap_err();
        assert_eq!(err.errors[0].location.map(|l| l.0), Some(3), "{err}");
        assert!(err.to_string().contains("gpu"), "{err}");
        let err = parse_toml("command = [\"x\"]\nshards = \"four\"\n").unwrap_err();
        assert_eq!(err.errors[0].location.map(|l| l.0), Some(2), "{err}");
    }

    #[test]
    fn several_errors_are_all_reported_in_line_order() {
        let src = "command = [\"x\"]\npriority = \"urgentest\"\n[placement]\nclouds = [\"gcp\"]\nspot = \"sometimes\"\n[env]\nTESSERA_RANK = \"1\"\n";
        let err = parse_toml(src).unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["priority", "placement.clouds[0]", "placement.spot", "env.TESSERA_RANK"], "{err}");
        assert_eq!(err.errors[3].location.map(|l| l.0), Some(6), "env errors point at the [env] table");
    }

    #[test]
    fn missing_command_is_reported() {
        let err = parse_toml("shards = 1\n").unwrap_err();
        assert_eq!(err.errors[0].field, "command");
    }

    #[test]
    fn bounds_are_enforced() {
        let mut s = JobSpec::new(vec!["x".into()], 1, 1);
        s.command = vec!["a".repeat(1000); 100];
        assert!(s.validate().is_err());
        let mut s = JobSpec::new(vec!["x".into()], limits::MAX_SHARDS + 1, 1);
        assert!(s.validate().is_err());
        s.shards = limits::MAX_SHARDS;
        assert!(s.validate().is_ok());
        s.name = "bad name".into();
        assert_eq!(s.validate().unwrap_err().errors[0].field, "name");
        let mut s = JobSpec::new(vec!["x".into()], 1, 1);
        for i in 0..=limits::MAX_ENV_VARS {
            s.env.insert(format!("V{i}"), "1".into());
        }
        assert_eq!(s.validate().unwrap_err().errors[0].field, "env");
    }

    #[test]
    fn one_line_maps_to_the_same_spec() {
        let line = OneLine {
            shards: Some(4),
            gpus: Some(8),
            gpu_model: Some("H100".into()),
            clouds: Some("aws,azure".into()),
            priority: Some("high".into()),
            name: Some("llama-sft".into()),
            tenant: Some("nlp".into()),
            max_runtime: Some("2h30m".into()),
            progress_timeout: None,
            launch: Some("per-gpu".into()),
            checkpoint_dir: Some("s3://ckpt/llama".into()),
            env: vec!["NCCL_DEBUG=INFO".into()],
            command: ["python", "train.py", "--lr", "3e-4"].map(String::from).to_vec(),
            ..Default::default()
        };
        let from_line = line.to_spec().unwrap();
        let mut from_toml = parse_toml(GOOD).unwrap();
        // Fields the one-line form does not carry:
        from_toml.resources.min_gpu_memory_mib = 0;
        from_toml.resources.cpu_millis = 0;
        from_toml.resources.memory_mib = 0;
        from_toml.placement.regions.clear();
        from_toml.placement.labels.clear();
        from_toml.placement.spot = SpotPolicy::Allow;
        from_toml.retry = RetryPolicy::default();
        from_toml.stop = StopPolicy::default();
        assert_eq!(from_line, from_toml);
    }

    #[test]
    fn one_line_errors_name_the_flag() {
        let line =
            OneLine { gpus: Some(0), priority: Some("soon".into()), command: vec!["x".into()], ..Default::default() };
        let err = line.to_spec().unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["--priority", "--gpus"]);
        let err = OneLine::default().to_spec().unwrap_err();
        assert!(err.errors[0].field.starts_with("command"));
        // Durations: parsed, then held to the spec's bounds, each error naming its flag.
        let ok = OneLine {
            max_runtime: Some("2h".into()),
            progress_timeout: Some("10m".into()),
            command: vec!["x".into()],
            ..Default::default()
        };
        let spec = ok.to_spec().unwrap();
        assert_eq!((spec.max_runtime_secs, spec.progress_timeout_secs), (Some(7200), Some(600)));
        let bad = OneLine {
            max_runtime: Some("soon".into()),
            progress_timeout: Some("5s".into()),
            env: vec!["NOEQUALS".into(), "TESSERA_RANK=1".into()],
            command: vec!["x".into()],
            ..Default::default()
        };
        let err = bad.to_spec().unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["--env", "--max-runtime", "--env", "--progress-timeout"], "{err}");
        assert!(err.to_string().contains("between 10 seconds and 365 days"), "{err}");
    }

    #[test]
    fn a_progress_timeout_in_a_spec_file() {
        let spec = parse_toml("command = [\"x\"]\nprogress_timeout = \"15m\"\n").unwrap();
        assert_eq!(spec.progress_timeout_secs, Some(900));
        let err = parse_toml("command = [\"x\"]\n\nprogress_timeout = 3\n").unwrap_err();
        assert_eq!(err.errors[0].field, "progress_timeout");
        assert_eq!(err.errors[0].location.map(|l| l.0), Some(3), "{err}");
    }

    #[test]
    fn array_forms_parse_count_and_print_back() {
        let a = ArraySpec::parse("0-999%50").unwrap();
        assert_eq!((a.len(), a.max_running), (1000, Some(50)));
        assert_eq!((a.index_at(0), a.index_at(999), a.index_at(1000)), (Some(0), Some(999), None));
        assert_eq!(a.to_string(), "0-999%50");
        let b = ArraySpec::parse("1,3, 8-20:4").unwrap();
        let all: Vec<u32> = (0..b.len()).filter_map(|p| b.index_at(p)).collect();
        assert_eq!(all, [1, 3, 8, 12, 16, 20]);
        assert_eq!(b.to_string(), "1,3,8-20:4");
        for (bad, says) in [
            ("", "lists no indices"),
            ("5-1", "runs backwards"),
            ("0-9%0", "not a limit"),
            ("0-9:0", "step of 0"),
            ("3,1", "increasing order"),
            ("0-5,5-9", "increasing order"),
            ("a-b", "not an index"),
            ("0-1000000", "at most 1000000"),
        ] {
            let err = ArraySpec::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        assert!(ArraySpec::parse("0-999999").is_ok());
    }

    #[test]
    fn arrays_and_dependencies_in_both_forms() {
        let spec = parse_toml("command = [\"x\"]\narray = \"0-9%2\"\nafter_ok = [4, \"job-5\"]\nafter_any = [\"6\"]\n")
            .unwrap();
        assert_eq!(spec.array.as_ref().map(ArraySpec::len), Some(10));
        assert_eq!((spec.after_ok.clone(), spec.after_any.clone()), (vec![4, 5], vec![6]));
        let line = OneLine {
            array: Some("0-9%2".into()),
            after_ok: Some("4,job-5".into()),
            after_any: Some("6".into()),
            command: vec!["x".into()],
            ..Default::default()
        };
        assert_eq!(line.to_spec().unwrap(), spec);
        let err = parse_toml("command = [\"x\"]\n\narray = \"9-0\"\nafter_ok = [\"x\"]\n").unwrap_err();
        let got: Vec<_> = err.errors.iter().map(|e| (e.field.as_str(), e.location.map(|l| l.0))).collect();
        assert_eq!(got, [("array", Some(3)), ("after_ok", Some(4))], "{err}");
        let bad = OneLine {
            array: Some("1-%3".into()),
            after_any: Some("0".into()),
            command: vec!["x".into()],
            ..Default::default()
        };
        let err = bad.to_spec().unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["--array", "--after-any"], "{err}");
    }

    #[test]
    fn launch_mode_in_a_spec_file_and_on_the_line() {
        assert_eq!(parse_toml("command = [\"x\"]\n").unwrap().launch, LaunchMode::Process);
        assert_eq!(parse_toml("command = [\"x\"]\nlaunch = \"process\"\n").unwrap().launch, LaunchMode::Process);
        let s = parse_toml("command = [\"x\"]\nshards = 2\nlaunch = \"per-gpu\"\n[resources]\ngpus = 4\n").unwrap();
        assert_eq!((s.launch, s.launch.processes_per_shard(s.resources.gpus)), (LaunchMode::PerGpu, 4));
        let err = parse_toml("command = [\"x\"]\n\nlaunch = \"per-node\"\n").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].field, "launch");
        assert_eq!(err.errors[0].location.map(|l| l.0), Some(3), "{err}");
        assert!(err.to_string().contains("process or per-gpu"), "{err}");
        let err = parse_toml("command = [\"x\"]\nlaunch = 1\n").unwrap_err();
        assert_eq!(err.errors[0].location.map(|l| l.0), Some(2), "{err}");
        // One process per GPU needs a GPU: the error says why.
        let err = parse_toml("command = [\"x\"]\nlaunch = \"per-gpu\"\n[resources]\ngpus = 0\n").unwrap_err();
        assert_eq!(err.errors[0].field, "resources.gpus", "{err}");
        assert!(err.errors[0].message.contains("one process per GPU"), "{err}");

        let line =
            |launch: &str| OneLine { launch: Some(launch.into()), command: vec!["x".into()], ..Default::default() };
        assert_eq!(line("per-gpu").to_spec().unwrap().launch, LaunchMode::PerGpu);
        assert_eq!(line("Process").to_spec().unwrap().launch, LaunchMode::Process);
        let err = line("gpu").to_spec().unwrap_err();
        assert_eq!(err.errors[0].field, "--launch", "{err}");
        let err = OneLine { gpus: Some(0), ..line("per-gpu") }.to_spec().unwrap_err();
        assert_eq!(err.errors[0].field, "--gpus", "{err}");
    }

    #[test]
    fn a_spec_without_launch_decodes_as_process_and_process_is_not_written() {
        let mut spec = JobSpec::new(vec!["x".into()], 2, 8);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("launch"), "{json}");
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap().launch, LaunchMode::Process);
        spec.launch = LaunchMode::PerGpu;
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"launch\":\"per-gpu\""), "{json}");
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn names_and_models() {
        assert_eq!(default_name(&["python3".into(), "/x/train.py".into()]), "train.py");
        assert_eq!(default_name(&["/usr/bin/sleep".into(), "1".into()]), "sleep");
        assert!(model_matches("H100", "NVIDIA H100 80GB HBM3"));
        assert!(model_matches("h100 80gb", "NVIDIA H100 80GB HBM3"));
        assert!(!model_matches("H10", "NVIDIA H100 80GB HBM3"));
        assert!(!model_matches("A100", "NVIDIA H100 80GB HBM3"));
        assert!(model_matches("A100", "A100-SXM4-80GB"));
    }

    #[test]
    fn durations_and_priorities() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("1h30m"), Ok(5400));
        assert_eq!(parse_duration_secs("7d"), Ok(604800));
        assert!(parse_duration_secs("1x").is_err());
        assert!(parse_duration_secs("h").is_err());
        assert!(parse_duration_secs("5m3").is_err());
        assert!(parse_duration_secs("99999999999999999999d").is_err());
        assert_eq!(parse_priority("critical"), Ok(1000));
        assert_eq!(parse_priority("42"), Ok(42));
        assert!(parse_priority("1001").is_err());
    }
}
