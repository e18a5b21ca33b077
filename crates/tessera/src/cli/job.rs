//! `tessera job`: submit, list, inspect, follow, read the output of, and cancel jobs.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use tessera_proto::v1;
use tessera_proto::v1::job_service_client::JobServiceClient;

use super::connect::{RpcError, Servers, UNARY_TIMEOUT, about, status_error};
use super::output::{self, Format, JobJson};
use super::{CliError, CliResult, ClientOpts, EXIT_FAILED};

/// How many times in a row a broken stream is opened again before giving up.
const MAX_REOPENS: u32 = 20;
/// Pause before opening a broken stream again.
const REOPEN_PAUSE: Duration = Duration::from_millis(500);
/// How often `job watch` reads the job besides its stream: on a terminal, for the bars.
const POLL_TTY: Duration = Duration::from_secs(1);
/// ... and otherwise, to notice a server that went silent.
const POLL_PLAIN: Duration = Duration::from_secs(2);
/// How long one of those reads may take; three late ones in a row count as a lost server.
const POLL_TIMEOUT: Duration = Duration::from_secs(3);

/// Flags and subcommand of `tessera job`.
#[derive(clap::Args, Debug)]
#[command(after_help = super::CLIENT_AFTER_HELP)]
pub struct JobArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Subcommand, Debug)]
enum JobCommand {
    /// Submit a job from a TOML spec file, or on one line: `--shards 2 --gpus 8 -- CMD ARGS...`.
    ///
    /// Prints the new job's id. A spec file is checked here first, like `tessera spec check`:
    /// every problem names its field and line, and the exit code is 2. With --watch, follows
    /// the job to its end like `tessera job watch` (exit 0 only if it succeeded).
    ///
    /// JSON: {"job_id": N, "deduplicated": bool}; with --watch on one line, followed by one
    /// Job document per line (see `tessera job status --help`).
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Submit(Box<SubmitArgs>),
    /// List jobs in id order: pending and running ones, or every job with --all.
    ///
    /// A job array is one row, with its elements' counts per state in the SHARDS column's
    /// place; --array ID lists the elements of one.
    ///
    /// JSON: {"jobs": [Job]}, each Job as `tessera job status` prints it, with "shards" empty.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    List {
        /// Include finished jobs (succeeded, failed, cancelled).
        #[arg(long, short = 'a')]
        all: bool,
        /// Only this tenant's jobs.
        #[arg(long)]
        tenant: Option<String>,
        /// The elements of this job array instead.
        #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
        array: Option<u64>,
    },
    /// Show a job and each shard: node, cloud, attempt, state, step, last checkpoint, restarts.
    ///
    /// JSON (a Job): {"id", "name", "tenant", "state": pending|running|succeeded|failed|cancelled,
    /// "priority", "num_shards", "gpus_per_shard", "gpu_model", "command": [..],
    /// "submitted_unix_ms", "started_unix_ms", "finished_unix_ms", "restarts", "failures",
    /// "cancel_requested", "message", "latest_checkpoint": Checkpoint|null, "shards": [Shard]};
    /// Shard: {"index", "state", "stop_reason", "node_id", "node", "cloud", "region",
    /// "attempt", "attempt_id", "attempts", "gpus": [..], "step", "total_steps", "metrics", "straggler",
    /// "restarts", "last_checkpoint": Checkpoint|null, "started_unix_ms"}; Checkpoint:
    /// {"step", "uri", "time_unix_ms", "shard_index"}. Absent values are null.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Status {
        /// The job id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Say why a job waits and what would let it run.
    ///
    /// Prints the reason (like Slurm's REASON, with the numbers), the fleet walked through
    /// the job's constraints one at a time (registered nodes, ready ones, those its placement
    /// rules admit, those with enough healthy GPUs of its kind, those with them free now), the
    /// jobs ahead of it in the queue, and what would let it run.
    ///
    /// JSON: {"job_id", "state", "reason": {"kind", "message"}|null, "explanation",
    /// "funnel": [{"label", "nodes"}], "jobs_ahead", "remedies": [..], "planned"}.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Why {
        /// The job id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Print a job's timeline: its submission, every placement, start, exit, checkpoint, stop
    /// (preemption, spot notice, GPU fault, drain, gang restart), lost node and requeue of its
    /// shards, and its end.
    ///
    /// Kept by the servers for as long as the job, finished or not: a job keeps its first 16
    /// events and its latest 240 (a line says how many were left out between). Training
    /// progress is not kept; `tessera job watch` shows it live.
    ///
    /// JSON: {"job_id", "dropped", "events": [{"sequence", "time_unix_ms", "kind", "shard",
    /// "attempt_id", "node_id", "node", "stop_reason", "message"}]}; kind is one of submitted,
    /// placed, shard_started, shard_exited, checkpoint, shard_stopping, shard_requeued,
    /// spot_notice, finished, preempted, node_lost, gpu_fault, restarted. Absent values are null.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Events {
        /// The job id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Print the output of a job's shards (stdout to stdout, stderr to stderr).
    ///
    /// Without --shard, lines of a job with several shards start with "[shard N] ". Each agent
    /// keeps its attempts' output (rotated at its --log-cap-mib, for its --log-retention), and
    /// the servers read it from there; with --follow, a shard is followed across its attempts.
    ///
    /// JSON: one line per chunk, {"shard", "attempt", "attempt_id", "stream": stdout|stderr,
    /// "offset", "data"} (data as UTF-8, invalid bytes replaced).
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Logs {
        /// The job id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Only this shard.
        #[arg(long)]
        shard: Option<u32>,
        /// Keep printing new output until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Start this many bytes before the end of each stream.
        #[arg(long, value_name = "BYTES")]
        tail: Option<u64>,
        /// Read this attempt number (see `job status`) instead of the latest.
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// Cancel a job: pending shards at once, running ones through the stop ladder.
    ///
    /// JSON: {"job_id", "state", "already_finished"}; state is "cancelled", or "running"
    /// while shards are still stopping, or the final state of a job that had already finished.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Cancel {
        /// The job id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Why, recorded in the job's message.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Follow a job to its end: a progress bar per shard on a terminal, plain lines otherwise.
    ///
    /// Exits 0 if the job succeeded, 1 if it failed or was cancelled.
    ///
    /// JSON: one Job document per line (see `tessera job status --help`) for each change, the
    /// last one in a final state.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Watch {
        /// The job id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
}

#[derive(clap::Args, Debug)]
struct SubmitArgs {
    /// A TOML job spec (see README). Leave it out for the one-line form.
    #[arg(value_name = "SPEC.toml", conflicts_with_all = ["shards", "gpus", "gpu_model", "cloud", "priority", "name", "tenant", "max_runtime", "progress_timeout", "launch", "checkpoint_dir", "env", "array", "after_ok", "after_any", "command"])]
    spec: Option<PathBuf>,
    /// One-line form: shards (nodes) of the gang [default: 1].
    #[arg(long)]
    shards: Option<u32>,
    /// One-line form: GPUs per shard [default: 1].
    #[arg(long)]
    gpus: Option<u32>,
    /// One-line form: GPU model, matched by whole words ("H100").
    #[arg(long, value_name = "MODEL")]
    gpu_model: Option<String>,
    /// One-line form: allowed clouds, comma-separated (aws, azure, none) [default: any].
    #[arg(long, value_name = "CLOUDS")]
    cloud: Option<String>,
    /// One-line form: low, normal, high, critical or 0..1000 [default: normal].
    #[arg(long)]
    priority: Option<String>,
    /// One-line form: job name [default: derived from the command].
    #[arg(long)]
    name: Option<String>,
    /// One-line form: tenant charged for the GPU-hours [default: default].
    #[arg(long)]
    tenant: Option<String>,
    /// One-line form: the longest an attempt may run, like 2h (enforced; lets the job backfill).
    #[arg(long, value_name = "DURATION")]
    max_runtime: Option<String>,
    /// One-line form: restart the gang from its checkpoint when a running shard reports no new
    /// step for this long, like 10m (a hang).
    #[arg(long, value_name = "DURATION")]
    progress_timeout: Option<String>,
    /// One-line form: how the agent starts each shard: one process (which may be torchrun, set
    /// up to join the gang without flags), or one process per GPU [default: process].
    #[arg(long, value_name = "MODE", value_parser = ["process", "per-gpu"])]
    launch: Option<String>,
    /// One-line form: where the job writes checkpoints (TESSERA_CHECKPOINT_DIR).
    #[arg(long, value_name = "PATH_OR_URI")]
    checkpoint_dir: Option<String>,
    /// One-line form: an environment variable for every shard, NAME=VALUE (repeatable).
    #[arg(long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// One-line form: a job array, one job per index with TESSERA_ARRAY_INDEX set, like
    /// 0-999%50 (indices 0 to 999, at most 50 unfinished at once) or 1,3,8-20:4.
    #[arg(long, value_name = "INDICES[%LIMIT]")]
    array: Option<String>,
    /// One-line form: place the job only after these jobs succeeded (comma-separated ids); if
    /// one does not, the job is cancelled.
    #[arg(long, value_name = "IDS")]
    after_ok: Option<String>,
    /// One-line form: place the job only after these jobs ended, however (comma-separated ids).
    #[arg(long, value_name = "IDS")]
    after_any: Option<String>,
    /// Key that makes a repeated submission return the first job instead of a new one
    /// [default: a fresh key per invocation, so retries across servers are safe].
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Follow the job to its end, like `tessera job watch`.
    #[arg(long, short = 'w')]
    watch: bool,
    /// One-line form: the command each shard runs, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Run `tessera job ...`.
pub async fn run(args: JobArgs) -> CliResult {
    let servers = Servers::from_opts(&args.client)?;
    let out = args.client.output;
    match args.command {
        JobCommand::Submit(a) => submit(&servers, *a, out).await,
        JobCommand::List { all, tenant, array } => list(&servers, all, tenant, array, out).await,
        JobCommand::Status { id } => status(&servers, id, out).await,
        JobCommand::Why { id } => why(&servers, id, out).await,
        JobCommand::Events { id } => events(&servers, id, out).await,
        JobCommand::Logs { id, shard, follow, tail, attempt } => {
            logs(&servers, LogsRequest { id, shard, follow, tail, attempt }, out).await
        }
        JobCommand::Cancel { id, reason } => cancel(&servers, id, reason, out).await,
        JobCommand::Watch { id } => watch(&servers, id, out).await,
    }
}

// ---------------------------------------------------------------------------------------------
// submit
// ---------------------------------------------------------------------------------------------

/// The spec a submission describes, checked here so problems name the field (and line).
fn submission_spec(a: &SubmitArgs) -> Result<tessera_core::JobSpec, CliError> {
    if let Some(file) = &a.spec {
        let src = std::fs::read_to_string(file)
            .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", file.display())))?;
        return tessera_core::spec::parse_toml(&src).map_err(|e| CliError::Invalid(format!("{}: {e}", file.display())));
    }
    if a.command.is_empty() {
        return Err(CliError::Invalid(
            "give a spec file (tessera job submit SPEC.toml) or a command after -- \
             (tessera job submit --gpus 1 -- python3 train.py)"
                .into(),
        ));
    }
    let line = tessera_core::spec::OneLine {
        shards: a.shards,
        gpus: a.gpus,
        gpu_model: a.gpu_model.clone(),
        clouds: a.cloud.clone(),
        priority: a.priority.clone(),
        name: a.name.clone(),
        tenant: a.tenant.clone(),
        max_runtime: a.max_runtime.clone(),
        progress_timeout: a.progress_timeout.clone(),
        launch: a.launch.clone(),
        checkpoint_dir: a.checkpoint_dir.clone(),
        env: a.env.clone(),
        array: a.array.clone(),
        after_ok: a.after_ok.clone(),
        after_any: a.after_any.clone(),
        command: a.command.clone(),
    };
    line.to_spec().map_err(|e| CliError::Invalid(e.to_string()))
}

/// A key unique to this invocation (a UUIDv7: time-ordered, 74 random bits): retrying on the
/// next server, or after the leader died, cannot submit twice.
fn fresh_key() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[derive(serde::Serialize)]
struct SubmitJson {
    job_id: u64,
    deduplicated: bool,
}

async fn submit(servers: &Servers, a: SubmitArgs, out: Format) -> CliResult {
    let spec = submission_spec(&a)?;
    let key = a.idempotency_key.clone().unwrap_or_else(fresh_key);
    let wire = v1::JobSpec::from(&spec);
    let resp = servers
        .call_repeatable(Some(UNARY_TIMEOUT), |ch| {
            let req = v1::SubmitJobRequest { spec: Some(wire.clone()), idempotency_key: key.clone() };
            async move { Ok(JobServiceClient::new(ch).submit_job(req).await?.into_inner()) }
        })
        .await?;
    // A key this invocation made up can only have been used by this invocation's own earlier
    // try (a server that died mid-call, or a leader change after the entry was replicated):
    // that job is the one this submission made, not an earlier submission's.
    let deduplicated = resp.deduplicated && a.idempotency_key.is_some();
    let doc = SubmitJson { job_id: resp.job_id, deduplicated };
    match out {
        Format::Json if a.watch => output::json_line(&doc)?,
        Format::Json => output::json(&doc)?,
        Format::Table if deduplicated => {
            output::line(format!("job {} (already submitted with this idempotency key)", resp.job_id))?
        }
        Format::Table => output::line(format!("job {} submitted", resp.job_id))?,
    }
    if a.watch { watch(servers, resp.job_id, out).await } else { Ok(0) }
}

// ---------------------------------------------------------------------------------------------
// list, status, cancel
// ---------------------------------------------------------------------------------------------

#[derive(serde::Serialize)]
struct ListJson {
    jobs: Vec<JobJson>,
}

async fn list(servers: &Servers, all: bool, tenant: Option<String>, array: Option<u64>, out: Format) -> CliResult {
    let jobs = servers
        .call_repeatable(Some(UNARY_TIMEOUT), |ch| {
            let tenant = tenant.clone().unwrap_or_default();
            async move {
                let mut c = JobServiceClient::new(ch);
                let mut jobs = Vec::new();
                let mut token = String::new();
                loop {
                    let req = v1::ListJobsRequest {
                        tenant: tenant.clone(),
                        include_finished: all,
                        page_size: 1000,
                        page_token: token.clone(),
                        array_job_id: array.unwrap_or(0),
                        ..Default::default()
                    };
                    let page = c.list_jobs(req).await?.into_inner();
                    jobs.extend(page.jobs);
                    if page.next_page_token.is_empty() || page.next_page_token == token {
                        return Ok(jobs);
                    }
                    token = page.next_page_token;
                }
            }
        })
        .await?;
    if out == Format::Json {
        output::json(&ListJson { jobs: jobs.iter().map(JobJson::from).collect() })?;
        return Ok(0);
    }
    if jobs.is_empty() {
        output::line(if all { "no jobs" } else { "no pending or running jobs (--all shows finished ones too)" })?;
        return Ok(0);
    }
    let mut t = output::table(&[
        "ID",
        "NAME",
        "TENANT",
        "STATE",
        "PRIORITY",
        "SHARDS",
        "GPUS/SHARD",
        "SUBMITTED",
        "RESTARTS",
        "REASON",
    ]);
    for j in &jobs {
        let spec = j.spec.clone().unwrap_or_default();
        let res = spec.resources.unwrap_or_default();
        let gpus =
            if res.gpu_model.is_empty() { res.gpus.to_string() } else { format!("{} {}", res.gpus, res.gpu_model) };
        let mut state = output::job_state(j.state);
        if j.cancel_requested && j.state == v1::JobState::Running as i32 {
            state.push_str(" (cancelling)");
        }
        let name = match (&j.array, j.array_index) {
            (Some(_), _) => format!("{} [{}]", spec.name, spec.array),
            (None, Some(i)) => format!("{}[{i}]", spec.name),
            _ => spec.name,
        };
        let shards = match &j.array {
            Some(a) => output::array_counts(a),
            None => spec.shards.to_string(),
        };
        t.add_row(vec![
            j.id.to_string(),
            name,
            spec.tenant,
            state,
            output::priority(spec.priority.unwrap_or(500)),
            shards,
            gpus,
            output::when(Some(j.submitted_unix_ms)),
            j.restarts.to_string(),
            j.pending_reason.as_ref().map_or_else(|| "-".into(), |r| output::reason_kind(r.kind)),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}

async fn get_job(servers: &Servers, id: u64) -> Result<v1::Job, CliError> {
    servers
        .call(Some(UNARY_TIMEOUT), |ch| async move {
            let r = JobServiceClient::new(ch)
                .get_job(v1::GetJobRequest { job_id: id, consistency: 0 })
                .await
                .map_err(about(format!("job {id}")))?;
            r.into_inner().job.ok_or_else(|| RpcError::Fatal(CliError::Failed(format!("the server sent no job {id}"))))
        })
        .await
}

async fn status(servers: &Servers, id: u64, out: Format) -> CliResult {
    let job = get_job(servers, id).await?;
    if out == Format::Json {
        output::json(&JobJson::from(&job))?;
        return Ok(0);
    }
    print_job(&job)?;
    Ok(0)
}

/// `job why`, as JSON.
#[derive(serde::Serialize)]
struct WhyJson {
    job_id: u64,
    state: String,
    reason: Option<output::ReasonJson>,
    explanation: String,
    funnel: Vec<FunnelJson>,
    jobs_ahead: u32,
    remedies: Vec<String>,
    planned: bool,
}

#[derive(serde::Serialize)]
struct FunnelJson {
    label: String,
    nodes: u64,
}

async fn why(servers: &Servers, id: u64, out: Format) -> CliResult {
    let w = servers
        .call_repeatable(Some(UNARY_TIMEOUT), |ch| async move {
            let r = JobServiceClient::new(ch)
                .explain_job(v1::ExplainJobRequest { job_id: id, consistency: 0 })
                .await
                .map_err(about(format!("job {id}")))?;
            Ok(r.into_inner())
        })
        .await?;
    if out == Format::Json {
        output::json(&WhyJson {
            job_id: id,
            state: output::job_state(w.state),
            reason: w.reason.as_ref().map(output::ReasonJson::from),
            explanation: w.explanation.clone(),
            funnel: w.funnel.iter().map(|s| FunnelJson { label: s.label.clone(), nodes: s.nodes }).collect(),
            jobs_ahead: w.jobs_ahead,
            remedies: w.remedies.clone(),
            planned: w.planned,
        })?;
        return Ok(0);
    }
    let Some(reason) = &w.reason else {
        output::line(format!("job {id}: {}", w.explanation))?;
        return Ok(0);
    };
    let mut lines = vec![format!("job {id} is {}: {}", output::job_state(w.state), reason.message)];
    lines.push(format!("reason:      {}", output::reason_kind(reason.kind)));
    lines.push(format!("jobs ahead:  {}", w.jobs_ahead));
    if !w.funnel.is_empty() {
        lines.push(String::new());
        lines.push("nodes, one constraint at a time:".into());
        let width = w.funnel.iter().map(|s| s.nodes.to_string().len()).max().unwrap_or(1);
        for s in &w.funnel {
            lines.push(format!("  {:>width$}  {}", s.nodes, s.label));
        }
    }
    lines.push(String::new());
    if w.remedies.is_empty() {
        lines.push("what would let it run: time; nothing to change".into());
    } else {
        lines.push("what would let it run:".into());
        for r in &w.remedies {
            lines.push(format!("  - {r}"));
        }
    }
    output::line(lines.join("\n"))?;
    Ok(0)
}

/// `job events`, as JSON.
#[derive(serde::Serialize)]
struct EventsJson {
    job_id: u64,
    dropped: u64,
    events: Vec<output::EventJson>,
}

async fn events(servers: &Servers, id: u64, out: Format) -> CliResult {
    let r = servers
        .call_repeatable(Some(UNARY_TIMEOUT), |ch| async move {
            let r = JobServiceClient::new(ch)
                .job_events(v1::JobEventsRequest { job_id: id, consistency: 0 })
                .await
                .map_err(about(format!("job {id}")))?;
            Ok(r.into_inner())
        })
        .await?;
    if out == Format::Json {
        let events = r.events.iter().map(output::EventJson::from).collect();
        output::json(&EventsJson { job_id: id, dropped: r.dropped, events })?;
        return Ok(0);
    }
    let start = r.events.first().map_or(0, |e| e.time_unix_ms);
    let mut t = output::table(&["TIME (UTC)", "AFTER", "SHARD", "EVENT", "MESSAGE"]);
    let mut next = 1;
    for e in &r.events {
        if e.sequence > next {
            let gap = e.sequence - next;
            t.add_row(vec!["".into(), "".into(), "".into(), "...".into(), format!("{gap} events left out")]);
        }
        next = e.sequence + 1;
        t.add_row(vec![
            output::utc(e.time_unix_ms),
            format!("+{}", output::span(e.time_unix_ms.saturating_sub(start))),
            output::opt(e.shard_index),
            output::event_kind(e.kind),
            e.message.clone(),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}

fn print_job(job: &v1::Job) -> Result<(), CliError> {
    let spec = job.spec.clone().unwrap_or_default();
    let res = spec.resources.clone().unwrap_or_default();
    let mut lines = vec![
        format!("job:          {} ({})", job.id, spec.name),
        format!(
            "state:        {}{}",
            output::job_state(job.state),
            if job.cancel_requested && job.state == v1::JobState::Running as i32 { ", cancel requested" } else { "" }
        ),
        format!("tenant:       {}", spec.tenant),
        format!("submitted by: {}", if job.submitted_by.is_empty() { "-" } else { &job.submitted_by }),
        format!("priority:     {}", output::priority(spec.priority.unwrap_or(500))),
        format!(
            "shards:       {} x {} GPU{}",
            spec.shards,
            res.gpus,
            if res.gpu_model.is_empty() { String::new() } else { format!(" ({})", res.gpu_model) }
        ),
        format!("command:      {}", spec.command.join(" ")),
        format!("submitted:    {}", output::when(Some(job.submitted_unix_ms))),
    ];
    if job.started_unix_ms.is_some() {
        lines.push(format!("started:      {}", output::when(job.started_unix_ms)));
    }
    if job.finished_unix_ms.is_some() {
        lines.push(format!("finished:     {}", output::when(job.finished_unix_ms)));
    }
    if let Some(a) = &job.array {
        lines.push(format!("array:        {} ({} elements): {}", spec.array, a.total, output::array_counts(a)));
        lines.push(format!("elements:     tessera job list --all --array {}", job.id));
    }
    if let Some(i) = job.array_index {
        lines.push(format!("array:        element {i} of job {} (TESSERA_ARRAY_INDEX={i})", job.array_job_id));
    }
    for (what, list) in [("after ok:    ", &spec.after_ok), ("after any:   ", &spec.after_any)] {
        if !list.is_empty() {
            let ids: Vec<String> = list.iter().map(u64::to_string).collect();
            lines.push(format!("{what} {}", ids.join(", ")));
        }
    }
    if !job.waiting_on.is_empty() {
        let ids: Vec<String> = job.waiting_on.iter().map(u64::to_string).collect();
        lines.push(format!("waiting on:   {} (not placed until they end)", ids.join(", ")));
    }
    lines.push(format!("restarts:     {} (failures counted against retries: {})", job.restarts, job.failures));
    if let Some(c) = &job.latest_checkpoint {
        lines.push(format!(
            "checkpoint:   step {} from shard {}, {}: {}",
            c.step,
            c.shard_index,
            output::when(Some(c.time_unix_ms)),
            c.uri
        ));
    }
    if !job.message.is_empty() {
        lines.push(format!("message:      {}", job.message));
    }
    if let Some(r) = &job.pending_reason {
        lines.push(format!(
            "waiting:      {} ({}; `tessera job why {}` says more)",
            r.message,
            output::reason_kind(r.kind),
            job.id
        ));
    }
    output::line(lines.join("\n"))?;
    if job.shards.is_empty() {
        return Ok(());
    }
    output::line("")?;
    let mut t = output::table(&["SHARD", "STATE", "NODE", "CLOUD", "ATTEMPT", "STEP", "LAST CHECKPOINT", "RESTARTS"]);
    for s in &job.shards {
        let mut state = output::shard_state(s.state);
        if let Some(r) = output::stop_reason(s.stop_reason) {
            state = format!("{state} ({r})");
        }
        t.add_row(vec![
            s.index.to_string(),
            state,
            if s.node_name.is_empty() { "-".into() } else { s.node_name.clone() },
            output::where_text(s.cloud, &s.region),
            if s.attempt == 0 { "-".into() } else { s.attempt.to_string() },
            if s.straggler { format!("{} (straggler)", output::step_text(s)) } else { output::step_text(s) },
            s.last_checkpoint
                .as_ref()
                .map_or("-".into(), |c| format!("step {}, {}", c.step, output::when(Some(c.time_unix_ms)))),
            s.restarts.to_string(),
        ]);
    }
    output::print_table(&t)
}

#[derive(serde::Serialize)]
struct CancelJson {
    job_id: u64,
    state: String,
    already_finished: bool,
}

async fn cancel(servers: &Servers, id: u64, reason: Option<String>, out: Format) -> CliResult {
    let r = servers
        .call_repeatable(Some(UNARY_TIMEOUT), |ch| {
            let req = v1::CancelJobRequest { job_id: id, reason: reason.clone().unwrap_or_default() };
            async move {
                Ok(JobServiceClient::new(ch).cancel_job(req).await.map_err(about(format!("job {id}")))?.into_inner())
            }
        })
        .await?;
    let state = output::job_state(r.state);
    if out == Format::Json {
        output::json(&CancelJson { job_id: id, state, already_finished: r.already_finished })?;
    } else if r.already_finished {
        output::line(format!("job {id} had already finished ({state}); nothing to cancel"))?;
    } else if r.state == v1::JobState::Cancelled as i32 {
        output::line(format!("job {id} cancelled"))?;
    } else {
        output::line(format!(
            "job {id}: cancel requested; its shards are stopping (follow with `tessera job watch {id}`)"
        ))?;
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// watch
// ---------------------------------------------------------------------------------------------

fn is_final(state: i32) -> bool {
    state >= v1::JobState::Succeeded as i32
}

/// What `job watch` remembers of a shard, to print only changes.
#[derive(PartialEq, Eq, Clone, Default)]
struct ShardSeen {
    state: i32,
    node: String,
    attempt: u32,
    checkpoint: Option<u64>,
}

/// How `job watch` shows a job: JSON lines, plain lines, or live progress bars.
enum View {
    Json {
        last: Option<Box<JobJson>>,
    },
    Plain {
        job_state: Option<i32>,
        shards: BTreeMap<u32, ShardSeen>,
    },
    Bars {
        multi: indicatif::MultiProgress,
        header: indicatif::ProgressBar,
        bars: BTreeMap<u32, (indicatif::ProgressBar, bool)>,
    },
}

impl View {
    fn new(out: Format) -> View {
        if out == Format::Json {
            return View::Json { last: None };
        }
        if !std::io::stdout().is_terminal() {
            return View::Plain { job_state: None, shards: BTreeMap::new() };
        }
        let multi = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stdout());
        let header = multi.add(indicatif::ProgressBar::new_spinner());
        header.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        header.enable_steady_tick(Duration::from_millis(120));
        View::Bars { multi, header, bars: BTreeMap::new() }
    }

    /// Show the job's new state; `event`, when the servers sent one, says what changed (plain
    /// lines print it instead of what they make out of the shards' states).
    fn update(&mut self, job: &v1::Job, event: Option<&v1::JobEvent>) -> Result<(), CliError> {
        // Progress moves the bars; as a line it would be noise.
        let event = event.filter(|e| e.kind != v1::JobEventKind::Progress as i32);
        match self {
            View::Json { last } => {
                // A reconnect starts with the state already printed: print each state once.
                let doc = Box::new(JobJson::from(job));
                if last.as_ref() == Some(&doc) {
                    return Ok(());
                }
                output::json_line(&doc)?;
                *last = Some(doc);
                Ok(())
            }
            View::Plain { job_state, shards } => {
                let mut lines = Vec::new();
                // What happened first; the job's state after it (a final state comes with the
                // last shard's exit) second.
                if let Some(e) = event.filter(|e| e.kind != v1::JobEventKind::Finished as i32) {
                    lines.push(output::event_line(e));
                }
                if *job_state != Some(job.state) {
                    *job_state = Some(job.state);
                    let msg = if is_final(job.state) && !job.message.is_empty() {
                        format!(": {}", job.message)
                    } else {
                        String::new()
                    };
                    lines.push(format!("job {}: {}{msg}", job.id, output::job_state(job.state)));
                }
                for s in &job.shards {
                    let now = ShardSeen {
                        state: s.state,
                        node: s.node_name.clone(),
                        attempt: s.attempt,
                        checkpoint: s.last_checkpoint.as_ref().map(|c| c.step),
                    };
                    let before = shards.insert(s.index, now.clone()).unwrap_or_default();
                    if event.is_some() {
                        // The event says it (below); the shard's state is only kept.
                    } else if before.state != now.state || before.node != now.node || before.attempt != now.attempt {
                        lines.push(format!("shard {}: {}", s.index, shard_line(s)));
                    } else if before.checkpoint != now.checkpoint
                        && let Some(c) = &s.last_checkpoint
                    {
                        lines.push(format!("shard {}: checkpoint at step {}", s.index, c.step));
                    }
                }
                if lines.is_empty() { Ok(()) } else { output::line(lines.join("\n")) }
            }
            View::Bars { multi, header, bars } => {
                if let Some(e) = event {
                    let _ = multi.println(output::event_line(e));
                }
                header.set_message(format!(
                    "job {} ({}): {}",
                    job.id,
                    job.spec.as_ref().map_or("", |s| s.name.as_str()),
                    output::job_state(job.state)
                ));
                for s in &job.shards {
                    let (bar, counted) = bars.entry(s.index).or_insert_with(|| {
                        let b = multi.add(indicatif::ProgressBar::new(0));
                        b.set_style(bar_style(false));
                        b.set_prefix(format!("shard {}", s.index));
                        (b, false)
                    });
                    // A bar only when the shard reported its total; a plain step count otherwise.
                    if *counted != s.total_steps.is_some() {
                        *counted = s.total_steps.is_some();
                        bar.set_style(bar_style(*counted));
                    }
                    if let Some(t) = s.total_steps {
                        bar.set_length(t);
                    }
                    bar.set_position(output::shard_step(s));
                    bar.set_message(shard_line(s));
                }
                Ok(())
            }
        }
    }

    /// The end: close the bars, say how it ended, and give the exit code (0 only on success).
    fn finish(&mut self, job: &v1::Job) -> CliResult {
        if let View::Bars { header, bars, .. } = self {
            for (b, _) in bars.values() {
                // Not finish(): that moves the position to the length, 0 for a bare step count.
                b.abandon();
            }
            header.finish_and_clear();
            let msg = if job.message.is_empty() { String::new() } else { format!(": {}", job.message) };
            output::line(format!("job {}: {}{msg}", job.id, output::job_state(job.state)))?;
        }
        Ok(if job.state == v1::JobState::Succeeded as i32 { 0 } else { EXIT_FAILED })
    }

    /// Print a note (a reconnect) without breaking the bars.
    fn note(&self, msg: &str) {
        match self {
            View::Bars { multi, .. } => {
                let _ = multi.println(msg);
            }
            _ => eprintln!("{msg}"),
        }
    }

    fn wants_progress(&self) -> bool {
        matches!(self, View::Bars { .. })
    }
}

/// The look of a shard's line: a bar when its total steps are known, else the step alone.
fn bar_style(counted: bool) -> indicatif::ProgressStyle {
    let (template, fallback) = if counted {
        ("  {prefix} [{bar:25}] {pos}/{len} {wide_msg}", indicatif::ProgressStyle::default_bar())
    } else {
        ("  {prefix} step {pos} {wide_msg}", indicatif::ProgressStyle::default_spinner())
    };
    indicatif::ProgressStyle::with_template(template).unwrap_or(fallback).progress_chars("=> ")
}

/// "running on gpu-a (aws/us-east-1), attempt 2, checkpoint step 40".
fn shard_line(s: &v1::Shard) -> String {
    let mut line = output::shard_state(s.state);
    if let Some(r) = output::stop_reason(s.stop_reason) {
        line.push_str(&format!(" ({r})"));
    }
    if !s.node_name.is_empty() {
        line.push_str(&format!(" on {} ({})", s.node_name, output::where_text(s.cloud, &s.region)));
    }
    if s.attempt > 0 {
        line.push_str(&format!(", attempt {}", s.attempt));
    }
    if let Some(c) = &s.last_checkpoint {
        line.push_str(&format!(", checkpoint step {}", c.step));
    }
    line
}

/// Follow a job until it reaches a final state; 0 if it succeeded, 1 otherwise.
async fn watch(servers: &Servers, id: u64, out: Format) -> CliResult {
    let mut view = View::new(out);
    let mut reopens = 0u32;
    loop {
        let opened = servers
            .call(Some(UNARY_TIMEOUT), |ch| async move {
                let s = JobServiceClient::new(ch.clone())
                    .watch_job(v1::WatchJobRequest { job_id: id })
                    .await
                    .map_err(about(format!("job {id}")))?
                    .into_inner();
                Ok((s, ch))
            })
            .await;
        let (mut stream, ch) = match opened {
            Ok(x) => x,
            Err(CliError::Failed(m)) if reopens > 0 && reopens < MAX_REOPENS => {
                reopens += 1;
                view.note(&format!("lost the servers ({m}); trying again"));
                tokio::time::sleep(REOPEN_PAUSE).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        // The job is also read every second or two: on a terminal this moves the bars (progress
        // changes without log entries), and everywhere it notices a server that stopped sending
        // (one shutting down keeps its streams open but silent) and a final state.
        let mut poll = tokio::time::interval(if view.wants_progress() { POLL_TTY } else { POLL_PLAIN });
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        let mut silent = 0u32;
        let broken = loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        reopens = 0;
                        let Some(job) = resp.job else { continue };
                        view.update(&job, resp.event.as_ref())?;
                        // Every event of the job's end carries its final state: the stream
                        // ends with FINISHED (or at once, for a job that had already ended).
                        let last = resp.event.as_ref().is_none_or(|e| e.kind == v1::JobEventKind::Finished as i32);
                        if is_final(job.state) && last {
                            return view.finish(&job);
                        }
                    }
                    Ok(None) => break "the stream ended early".to_string(),
                    Err(s) if stream_broken(&s) => break output_status(&s),
                    Err(s) => return Err(status_error(&s)),
                },
                _ = poll.tick() => match poll_job(&ch, id, &mut silent).await {
                    Err(why) => break why,
                    Ok(Some(job)) if is_final(job.state) => {
                        view.update(&job, None)?;
                        return view.finish(&job);
                    }
                    Ok(Some(job)) if view.wants_progress() => view.update(&job, None)?,
                    Ok(_) => {}
                },
            }
        };
        reopens += 1;
        if reopens >= MAX_REOPENS {
            return Err(CliError::Failed(format!("lost the watch of job {id}: {broken}")));
        }
        view.note(&format!("watch of job {id} interrupted ({broken}); reconnecting"));
        tokio::time::sleep(REOPEN_PAUSE).await;
    }
}

/// Does this error end a stream in a way another server (or the same one, again) may mend?
fn stream_broken(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal | Code::DeadlineExceeded)
}

fn output_status(s: &tonic::Status) -> String {
    super::connect::describe_status(s)
}

/// One poll of a followed job on the server of its stream, which notices a server that keeps
/// the stream open but stopped answering: the job when it answered, None after an error worth
/// ignoring, Err(why) when the stream should be opened again (elsewhere).
async fn poll_job(ch: &super::connect::Conn, id: u64, silent: &mut u32) -> Result<Option<v1::Job>, String> {
    let mut client = JobServiceClient::new(ch.clone());
    let get = client.get_job(v1::GetJobRequest { job_id: id, consistency: 0 });
    match tokio::time::timeout(POLL_TIMEOUT, get).await {
        Ok(Ok(r)) => {
            *silent = 0;
            Ok(r.into_inner().job)
        }
        Ok(Err(s)) if stream_broken(&s) => Err(output_status(&s)),
        Ok(Err(_)) => Ok(None),
        Err(_) => {
            *silent += 1;
            if *silent >= 3 { Err("the server stopped answering".to_string()) } else { Ok(None) }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// logs
// ---------------------------------------------------------------------------------------------

struct LogsRequest {
    id: u64,
    shard: Option<u32>,
    follow: bool,
    tail: Option<u64>,
    attempt: Option<u32>,
}

#[derive(serde::Serialize)]
struct ChunkJson {
    shard: u32,
    attempt: u32,
    attempt_id: u64,
    stream: String,
    offset: u64,
    data: String,
}

/// Prints chunks once each, even when a reconnect sends some again, and prefixes lines with
/// their shard when asked.
struct LogPrinter {
    out: Format,
    prefix: bool,
    /// (attempt id, stream) -> end offset printed.
    printed: BTreeMap<(u64, i32), u64>,
    /// (shard, stream) -> the unfinished line.
    partial: BTreeMap<(u32, i32), Vec<u8>>,
    /// shard -> attempt number last printed.
    attempts: BTreeMap<u32, u32>,
}

impl LogPrinter {
    fn chunk(&mut self, c: v1::JobLogsResponse) -> Result<(), CliError> {
        let end = c.offset + c.data.len() as u64;
        let done = self.printed.get(&(c.attempt_id, c.stream)).copied().unwrap_or(0);
        if end <= done && !c.data.is_empty() {
            return Ok(());
        }
        let skip = usize::try_from(done.saturating_sub(c.offset)).unwrap_or(usize::MAX).min(c.data.len());
        let data = &c.data[skip..];
        self.printed.insert((c.attempt_id, c.stream), end);
        let is_stderr = c.stream == v1::LogStream::Stderr as i32;
        match self.out {
            Format::Json => output::json_line(&ChunkJson {
                shard: c.shard_index,
                attempt: c.attempt,
                attempt_id: c.attempt_id,
                stream: output::log_stream(c.stream),
                offset: c.offset + skip as u64,
                data: String::from_utf8_lossy(data).into_owned(),
            }),
            Format::Table => {
                let before = self.attempts.insert(c.shard_index, c.attempt);
                if before.is_some_and(|b| b != c.attempt) {
                    output::write_stderr(
                        format!("--- shard {}, attempt {} ---\n", c.shard_index, c.attempt).as_bytes(),
                    )?;
                }
                if !self.prefix {
                    return if is_stderr { output::write_stderr(data) } else { output::write_stdout(data) };
                }
                let buf = self.partial.entry((c.shard_index, c.stream)).or_default();
                buf.extend_from_slice(data);
                let Some(last) = buf.iter().rposition(|b| *b == b'\n') else { return Ok(()) };
                let rest = buf.split_off(last + 1);
                let complete = std::mem::replace(buf, rest);
                let mut text = Vec::new();
                for l in complete.split_inclusive(|b| *b == b'\n') {
                    text.extend_from_slice(format!("[shard {}] ", c.shard_index).as_bytes());
                    text.extend_from_slice(l);
                }
                if is_stderr { output::write_stderr(&text) } else { output::write_stdout(&text) }
            }
        }
    }

    /// Print unfinished lines at the end.
    fn flush(&mut self) -> Result<(), CliError> {
        for ((shard, stream), buf) in std::mem::take(&mut self.partial) {
            if buf.is_empty() {
                continue;
            }
            let mut text = format!("[shard {shard}] ").into_bytes();
            text.extend_from_slice(&buf);
            text.push(b'\n');
            if stream == v1::LogStream::Stderr as i32 {
                output::write_stderr(&text)?
            } else {
                output::write_stdout(&text)?
            }
        }
        Ok(())
    }
}

async fn logs(servers: &Servers, r: LogsRequest, out: Format) -> CliResult {
    let id = r.id;
    // Also says "job N not found" before any stream opens.
    let job = get_job(servers, id).await?;
    if let Some(s) = r.shard
        && s >= job.spec.as_ref().map_or(0, |spec| spec.shards)
    {
        return Err(CliError::NotFound(format!("job {id} has no shard {s}")));
    }
    let shards = job.spec.as_ref().map_or(1, |s| s.shards);
    let mut printer = LogPrinter {
        out,
        prefix: r.shard.is_none() && shards > 1,
        printed: BTreeMap::new(),
        partial: BTreeMap::new(),
        attempts: BTreeMap::new(),
    };
    let req = v1::JobLogsRequest {
        job_id: id,
        shard_index: r.shard,
        streams: v1::LogSelection::Both as i32,
        follow: r.follow,
        tail_bytes: r.tail,
        attempt: r.attempt,
    };
    let mut reopens = 0u32;
    loop {
        let opened = servers
            .call(Some(UNARY_TIMEOUT), |ch| async move {
                let s = JobServiceClient::new(ch.clone()).job_logs(req).await.map_err(about(format!("job {id}")))?;
                Ok((s.into_inner(), ch))
            })
            .await;
        let (mut stream, ch) = match opened {
            Ok(s) => s,
            Err(CliError::Failed(m)) if reopens > 0 && reopens < MAX_REOPENS => {
                reopens += 1;
                eprintln!("lost the servers ({m}); trying again");
                tokio::time::sleep(REOPEN_PAUSE).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        // While following, the server is asked about the job now and then, so that one that
        // went silent (shutting down with the stream open) is noticed and left.
        let mut poll = tokio::time::interval(POLL_PLAIN);
        poll.reset();
        let mut silent = 0u32;
        let broken = loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(c)) => {
                        reopens = 0;
                        printer.chunk(c)?;
                    }
                    Ok(None) => {
                        printer.flush()?;
                        return Ok(0);
                    }
                    Err(s) if stream_broken(&s) => break output_status(&s),
                    Err(s) => return Err(status_error(&s)),
                },
                _ = poll.tick(), if r.follow => {
                    if let Err(why) = poll_job(&ch, id, &mut silent).await {
                        break why;
                    }
                }
            }
        };
        reopens += 1;
        if reopens >= MAX_REOPENS {
            printer.flush()?;
            return Err(CliError::Failed(format!("lost the output of job {id}: {broken}")));
        }
        eprintln!("output of job {id} interrupted ({broken}); reconnecting");
        tokio::time::sleep(REOPEN_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printer() -> LogPrinter {
        LogPrinter {
            out: Format::Json,
            prefix: false,
            printed: BTreeMap::new(),
            partial: BTreeMap::new(),
            attempts: BTreeMap::new(),
        }
    }

    fn chunk(offset: u64, data: &str) -> v1::JobLogsResponse {
        v1::JobLogsResponse {
            shard_index: 0,
            attempt_id: 7,
            attempt: 1,
            stream: v1::LogStream::Stdout as i32,
            offset,
            data: data.as_bytes().to_vec(),
        }
    }

    #[test]
    fn chunks_sent_again_after_a_reconnect_are_printed_once() {
        let mut p = printer();
        p.chunk(chunk(0, "hello\n")).unwrap();
        assert_eq!(p.printed[&(7, 1)], 6);
        // The same bytes again, then an overlapping chunk: only the new part counts.
        p.chunk(chunk(0, "hello\n")).unwrap();
        p.chunk(chunk(3, "lo\nworld\n")).unwrap();
        assert_eq!(p.printed[&(7, 1)], 12);
    }

    #[test]
    fn a_submission_needs_a_spec_or_a_command() {
        let a = SubmitArgs {
            spec: None,
            shards: Some(2),
            gpus: Some(0),
            gpu_model: None,
            cloud: Some("aws,gcp".into()),
            priority: None,
            name: None,
            tenant: None,
            max_runtime: None,
            progress_timeout: None,
            launch: None,
            checkpoint_dir: None,
            env: Vec::new(),
            array: None,
            after_ok: None,
            after_any: None,
            idempotency_key: None,
            watch: false,
            command: vec![],
        };
        assert!(matches!(submission_spec(&a), Err(CliError::Invalid(m)) if m.contains("after --")));
        let a = SubmitArgs { command: vec!["python3".into(), "t.py".into()], ..a };
        match submission_spec(&a) {
            Err(CliError::Invalid(m)) => assert!(m.contains("--gpus") && m.contains("--cloud"), "{m}"),
            other => panic!("{other:?}"),
        }
        let a = SubmitArgs { gpus: Some(8), cloud: Some("aws,azure".into()), ..a };
        let spec = submission_spec(&a).unwrap();
        assert_eq!((spec.shards, spec.resources.gpus, spec.placement.clouds.len()), (2, 8, 2));
        assert_eq!(spec.name, "t.py");
        let a = SubmitArgs { array: Some("0-99%5".into()), after_ok: Some("3,job-4".into()), ..a };
        let spec = submission_spec(&a).unwrap();
        assert_eq!(spec.array.map(|x| (x.len(), x.max_running)), Some((100, Some(5))));
        assert_eq!(spec.after_ok, [3, 4]);
        let a = SubmitArgs { array: Some("9-1".into()), ..a };
        assert!(matches!(submission_spec(&a), Err(CliError::Invalid(m)) if m.contains("--array")));
    }
}
